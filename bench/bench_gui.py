"""Console responsiveness on a big history: with 1,000,000 writes journaled, how fast is the
preview after a slider move (target: p95 < 100 ms) and how fast does the window open (< 2 s)?

The store: a 64 MiB FAT16 image with a few folders and a 48 MiB file, protected from empty, then
1,000,000 random 4 KiB writes into that file's data (so the filesystem stays valid and every
point lists a real tree), made with store.live.write_many in batches, a mark every 100,000.
Built once and kept under bench/results/gui-store/ (delete it to rebuild).

The peer is the same preview code reading a plain image file (no history): the ratio says what
reading a past point through the journal costs over reading a file.

    .venv/bin/python -m bench.bench_gui [--quick] [--writes N] [--moves N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SIZE = 64 << 20
BIG_FILE = 48 << 20
MAGIC = b"REWIND-BENCH-BIG-FILE-START\n"


def build_store(dest: Path, writes: int) -> dict[str, object]:
    """Create the benchmark store (cached by its write count)."""
    from pyfatfs.PyFatFS import PyFatBytesIOFS
    from rewind.app.demo import copy_in, make_fat_image
    from rewind.engine.store import Store

    meta_path = dest / "bench.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("writes") == writes and (dest / "store" / "store.json").exists():
            return dict(meta)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "fat.img"
        make_fat_image(img, SIZE, "BENCH")
        with open(img, "r+b") as f:
            fs = PyFatBytesIOFS(f)
            for d in ("/Documents", "/Photos", "/Projects/alpha", "/Projects/beta"):
                fs.makedirs(d, recreate=True)
            rng = random.Random(1)
            for i in range(60):
                folder = rng.choice(["/Documents", "/Photos", "/Projects/alpha", "/Projects/beta"])
                with fs.openbin(f"{folder}/file-{i:03d}.txt", "w") as g:
                    g.write((f"file {i}\n" * rng.randint(10, 400)).encode())
            with fs.openbin("/big.bin", "w") as g:
                g.write(MAGIC + bytes(BIG_FILE - len(MAGIC)))
            fs.close()
        raw = img.read_bytes()
        start = raw.index(MAGIC)
        start = -(-start // 4096) * 4096 + 4096  # whole blocks inside the file, past its first one
        end = start + BIG_FILE - 3 * 4096
        store = Store.create(dest / "disk.img", dest / "store", size=SIZE)
        copy_in(store.live, img)
    store.mark("formatted")
    rng = random.Random(2)
    nblocks = (end - start) // 4096
    payload = [os.urandom(4096) for _ in range(64)]
    batch = 512
    done = 0
    while done < writes:
        n = min(batch, writes - done)
        reqs = [("write", start + rng.randrange(nblocks) * 4096, payload[(done + i) % 64]) for i in range(n)]
        store.live.write_many(reqs)  # type: ignore[arg-type]
        done += n
        if done % 100_000 == 0:
            store.mark(f"w{done // 1000}k")
    store.live.flush()
    head = store.head
    store.close()
    meta = {"writes": writes, "head": head, "build_s": round(time.perf_counter() - t0, 1)}
    meta_path.write_text(json.dumps(meta))
    return meta


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def measure_previews(store_dir: Path, moves: int) -> dict[str, list[float]]:
    """Slider moves in the real window: time from the move to the preview shown (ms)."""
    from PySide6.QtCore import QSettings
    from rewind.app.main import MainWindow, make_app

    cfg = tempfile.mkdtemp(prefix="rewind-bench-cfg-")
    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, cfg)
    app = make_app()
    win = MainWindow()
    win.resize(1360, 880)
    win.show()
    view = win.open_store(str(store_dir))
    assert view is not None

    stalls: list[float] = []

    def wait(cond: object, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            t = time.perf_counter()
            app.processEvents()  # everything the GUI thread does runs in here
            stalls.append((time.perf_counter() - t) * 1000)
            if cond():  # type: ignore[operator]
                return
            time.sleep(0.0005)
        raise TimeoutError("the console did not answer")

    wait(lambda: view.snap is not None and view.preview is not None)
    horizon, head = view.snap.horizon, view.snap.head
    t_lo, t_hi = view.snap.horizon_time, view.snap.head_time
    rng = random.Random(3)
    out: dict[str, list[float]] = {"seq": [], "time": [], "build": []}
    stalls.clear()
    for i in range(moves):
        kind = "seq" if i % 2 == 0 else "time"
        view.throttle.stop()  # each move is a fresh one (the throttle only merges moves within 60 ms)
        t0 = time.perf_counter()
        if kind == "seq":
            view.go_to_seq(rng.randrange(horizon, head))
        else:
            view.timeline.timeRequested.emit(rng.randrange(t_lo, t_hi))
        gen = view.worker.preview_gen
        wait(lambda g=gen: view.shown_gen >= g)
        out[kind].append((time.perf_counter() - t0) * 1000)
        out["build"].append(view.preview.elapsed_ms)
    out["files"] = [float(len(view.preview.files()))]
    out["stall"] = list(stalls)
    win.close()
    app.processEvents()
    shutil.rmtree(cfg, ignore_errors=True)
    return out


def measure_plain(image: Path, moves: int) -> list[float]:
    """The peer: the same preview code over a plain image file (no journal, no history)."""
    from rewind.app.preview import read_tree

    class FileView:
        def __init__(self, path: Path) -> None:
            self.f = open(path, "rb")
            self.size = path.stat().st_size

        def read(self, off: int, n: int) -> bytes:
            return os.pread(self.f.fileno(), n, off)

    view = FileView(image)
    times = []
    for _ in range(moves):
        t0 = time.perf_counter()
        read_tree(view)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def open_timing(store_dir: str) -> None:
    """Child process: from interpreter start to the window shown with the store's charts and
    first preview on screen."""
    t0 = time.perf_counter()
    from PySide6.QtCore import QSettings
    from rewind.app.main import MainWindow, make_app

    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, tempfile.mkdtemp())
    app = make_app()
    win = MainWindow()
    win.show()
    app.processEvents()
    shown = time.perf_counter() - t0
    view = win.open_store(store_dir)
    assert view is not None
    end = time.monotonic() + 60
    while time.monotonic() < end and not (view.snap is not None and view.preview is not None):
        app.processEvents()
        time.sleep(0.001)
    ready = time.perf_counter() - t0
    print(json.dumps({"shown": shown, "ready": ready}))
    win.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100,000 writes and fewer moves (smoke run)")
    ap.add_argument("--writes", type=int, default=None)
    ap.add_argument("--moves", type=int, default=None)
    ap.add_argument("--open-timing", metavar="STORE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.open_timing:
        open_timing(args.open_timing)
        return 0
    writes = args.writes or (100_000 if args.quick else 1_000_000)
    moves = args.moves or (40 if args.quick else 200)
    dest = RESULTS / f"gui-store-{writes}"
    t = time.perf_counter()
    meta = build_store(dest, writes)
    print(f"store: {writes:,} writes journaled, head record {meta['head']:,} "
          f"({'built in ' + str(meta['build_s']) + ' s' if time.perf_counter() - t > 1 else 'cached'}: {dest})")

    opens = []
    for _ in range(3):
        r = subprocess.run([sys.executable, "-m", "bench.bench_gui", "--open-timing", str(dest / "store")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if not line:
            print(r.stdout, r.stderr)
            return 1
        opens.append(json.loads(line[-1]))
    res = measure_previews(dest / "store", moves)
    # the peer reads the image as it is now (a plain file, no history)
    plain = measure_plain(dest / "disk.img", moves)
    both = res["seq"] + res["time"]

    def row(name: str, vals: list[float], target: float | None, unit: str = "ms") -> str:
        p50, p95 = pct(vals, 50), pct(vals, 95)
        verdict = "" if target is None else ("ok" if p95 < target else "OVER")
        ratio = f"{p95 / target:5.2f}" if target else "    -"
        return f"{name:<38} {p50:9.1f} {p95:9.1f} {unit:>3}  {ratio}  {verdict}"

    print(f"\nfiles listed per preview: {int(res['files'][0])}; moves: {len(both)}")
    print(f"{'measure':<38} {'p50':>9} {'p95':>9}      p95/target")
    print(row("preview after slider move (all)", both, 100.0))
    print(row("  by record (keyboard, mark click)", res["seq"], 100.0))
    print(row("  by time (drag)", res["time"], 100.0))
    print(row("  of which reading the point (worker)", res["build"], None))
    print(row("peer: same tree read from a plain file", plain, None))
    st = res["stall"]
    print(f"{'GUI thread: longest stall while moving':<38} {pct(st, 50):9.1f} {max(st):9.1f} ms  "
          f"{max(st) / 50:5.2f}  {'ok' if max(st) < 50 else 'OVER'}   (max vs 50 ms)")
    print(f"{'journal read cost (p50 ratio to peer)':<38} {pct(both, 50) / max(0.01, pct(plain, 50)):9.1f}x")
    shown = [o["shown"] * 1000 for o in opens]
    ready = [o["ready"] * 1000 for o in opens]
    print(row("window open (start -> window shown)", shown, 2000.0))
    print(row("window open + store charts + preview", ready, 2000.0))
    ok = pct(both, 95) < 100 and max(ready) < 2000
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
