"""FUSE view and watch-mode benchmark, in one run.

1. Sequential 1 MiB writes (dd) to MNT/live.img vs the same writes to a plain file on the same
   disk, fresh sparse files each run, alternated, medians. Buffered and with fdatasync at the end.
   Two diagnostic rows say where the time goes: the engine alone (store.live.write from Python, no
   FUSE) and FUSE alone (a null volume that drops writes). Target: live.img >= 0.5x plain.
2. Watch mode: scan of a 1 GiB image (fully written, page cache warm and cold) after 1% of its
   blocks changed in place. Target: < 2 s.

    .venv/bin/python -m bench.bench_fuse [--quick] [--size-mb 1024] [--rounds 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rewind.engine.frontends.fuse import FuseView
from rewind.engine.frontends.watch import Watcher, watch_protect
from rewind.engine.store import Store

MiB = 1 << 20


def fresh(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def dd_write(target: Path, size: int, sync: bool) -> float:
    """MB/s of dd bs=1M over `size` bytes into an existing file (conv=notrunc)."""
    conv = "notrunc,fdatasync" if sync else "notrunc"
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={size // MiB}", f"conv={conv}",
                    "status=none"], check=True)
    return size / (time.perf_counter() - t) / 1e6


class _NullVol:
    readonly = False

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, off: int, n: int) -> bytes:
        return bytes(n)

    def write(self, off: int, data: Any, fua: bool = False) -> None:
        pass

    def flush(self) -> None:
        pass


class _NullStore:
    """Just enough of a store for FuseView: measures FUSE + Python without the engine."""

    block_size = 4096

    def __init__(self, size: int, d: Path) -> None:
        self.size = size
        self.dir = d
        self.live = _NullVol(size)

    def marks(self) -> list[Any]:
        return []


def bench_writes(base: Path, size: int, rounds: int) -> list[tuple[str, float, float]]:
    res: dict[tuple[str, bool], list[float]] = {}
    mnt = base / "mnt"
    mnt.mkdir()
    for _ in range(rounds):
        for sync in (False, True):
            plain = base / "plain.img"
            fresh(plain, size)
            res.setdefault(("plain", sync), []).append(dd_write(plain, size, sync))
            plain.unlink()

            store = Store.create(base / "disk.img", base / "store", size=size)
            try:
                with FuseView(store, mnt) as view:
                    res.setdefault(("live", sync), []).append(dd_write(view.live_path, size, sync))
            finally:
                store.close()
            shutil.rmtree(base / "store")
            (base / "disk.img").unlink()

            store = Store.create(base / "disk.img", base / "store", size=size)
            try:
                buf = bytes(MiB)
                t = time.perf_counter()
                for off in range(0, size, MiB):
                    store.live.write(off, buf)
                if sync:
                    store.live.flush()
                res.setdefault(("engine", sync), []).append(size / (time.perf_counter() - t) / 1e6)
            finally:
                store.close()
            shutil.rmtree(base / "store")
            (base / "disk.img").unlink()

            with FuseView(_NullStore(size, base), mnt) as view:  # type: ignore[arg-type]
                res.setdefault(("nullfuse", sync), []).append(dd_write(view.live_path, size, sync))
    out = []
    for key in ("plain", "live", "engine", "nullfuse"):
        out.append((key, statistics.median(res[(key, False)]), statistics.median(res[(key, True)])))
    return out


def make_image(path: Path, size: int) -> None:
    """A fully written image (no holes: the scan's worst case), distinct blocks."""
    seed = bytearray(os.urandom(8 * MiB))
    with open(path, "wb") as f:
        for i in range(size // len(seed)):
            seed[:8] = i.to_bytes(8, "little")
            for j in range(0, len(seed), 4096):  # distinct first bytes per block
                seed[j + 8:j + 12] = (i * 4096 + j).to_bytes(4, "little")
            f.write(seed)


def bench_watch(base: Path, size: int) -> dict[str, float]:
    prim = base / "watched.img"
    make_image(prim, size)
    t = time.perf_counter()
    store = watch_protect(prim, base / "wstore")
    prep = time.perf_counter() - t
    out: dict[str, float] = {"prepare_s": prep}
    try:
        w = Watcher(store)
        w.prepare()
        os.sync()  # a running watcher's shadow was written long ago: do not time its writeback
        nblocks = size // 4096
        rng = random.Random(1)
        for label, cold in (("warm", False), ("cold", True)):
            picks = rng.sample(range(nblocks), nblocks // 100)
            with open(prim, "r+b") as f:
                for b in picks:
                    f.seek(b * 4096)
                    f.write(os.urandom(4096))
                f.flush()
                os.fsync(f.fileno())  # the writer's own cost, not the scan's
                if cold:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            os.sync()
            r = w.scan()
            assert r.changed_blocks == len(picks), (r.changed_blocks, len(picks))
            out[f"scan_{label}_s"] = r.seconds
            out["changed"] = r.changed_blocks
        t = time.perf_counter()
        w.scan(quick=True)  # mtime within 2 s of the last scan: not trusted, a full pass
        out["racy_noop_s"] = time.perf_counter() - t
        time.sleep(2.1)
        w.scan()
        t = time.perf_counter()
        r = w.scan(quick=True)
        assert r.skipped
        out["quick_noop_s"] = time.perf_counter() - t
    finally:
        store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.bench_fuse", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, 1 round")
    ap.add_argument("--size-mb", type=int, help="MiB written per run and the watched image size (default 1024)")
    ap.add_argument("--rounds", type=int, help="rounds of the write benchmark, medians printed (default 2)")
    ap.add_argument("--dir", default=None, help="where to put the files (default: the temp dir)")
    ap.add_argument("--skip-writes", action="store_true")
    ap.add_argument("--skip-watch", action="store_true")
    a, _unknown = ap.parse_known_args(argv)  # bench/__main__ passes the same flags to every bench
    a.size_mb = a.size_mb or (256 if a.quick else 1024)
    a.rounds = a.rounds or (1 if a.quick else 2)
    size = a.size_mb * MiB
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        print("bench_fuse: no /dev/fuse or fusermount3; skipping the FUSE write benchmark")
        a.skip_writes = True
    base = Path(tempfile.mkdtemp(prefix="rewind-bench-fuse-", dir=a.dir))
    ok = True
    try:
        if not a.skip_writes:
            rows = bench_writes(base, size, a.rounds)
            plain = {r[0]: r for r in rows}["plain"]
            print(f"\nFUSE view: sequential 1 MiB writes, {a.size_mb} MiB, dd, median of {a.rounds}")
            print(f"{'target':<34}{'buffered MB/s':>14}{'x plain':>9}{'+fdatasync MB/s':>17}{'x plain':>9}")
            names = {"plain": "plain file (same disk)", "live": "MNT/live.img (FUSE + engine)",
                     "engine": "  engine alone (no FUSE)", "nullfuse": "  FUSE alone (null volume)"}
            for key, buf, syn in rows:
                print(f"{names[key]:<34}{buf:>14.0f}{buf / plain[1]:>9.2f}{syn:>17.0f}{syn / plain[2]:>9.2f}")
            print("(live.img's buffered run is durable too: close() on the view syncs the journal, "
                  "so compare it with the fdatasync column)")
            live = {r[0]: r for r in rows}["live"]
            r_buf, r_sync = live[1] / plain[1], live[2] / plain[2]
            met = r_sync >= 0.5
            ok &= met
            print(f"target live.img >= 0.5x plain: buffered {r_buf:.2f}x, durable {r_sync:.2f}x -> "
                  f"{'met' if met else 'NOT met'} (durable)")
        if not a.skip_watch:
            w = bench_watch(base, size)
            print(f"\nWatch mode: {a.size_mb} MiB image, {int(w['changed'])} blocks (1%) changed in place")
            print(f"{'step':<40}{'seconds':>10}")
            print(f"{'shadow copy + digests (protect --watch)':<40}{w['prepare_s']:>10.2f}")
            print(f"{'scan, page cache warm':<40}{w['scan_warm_s']:>10.2f}")
            print(f"{'scan, page cache cold':<40}{w['scan_cold_s']:>10.2f}")
            print(f"{'no change, mtime too recent (full pass)':<40}{w['racy_noop_s']:>10.2f}")
            print(f"{'no change, mtime+size check only':<40}{w['quick_noop_s']:>10.4f}")
            met = w["scan_warm_s"] < 2.0
            ok &= met
            print(f"target scan < 2 s: {'met' if met else 'NOT met'} (warm {w['scan_warm_s']:.2f} s, "
                  f"cold {w['scan_cold_s']:.2f} s)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nbench_fuse: {'all targets met' if ok else 'a target was NOT met (see above)'}")
    return 0  # like the other benches: exit status says it ran, the table says how well


if __name__ == "__main__":
    sys.exit(main())
