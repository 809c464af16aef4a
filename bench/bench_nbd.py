"""NBD benchmark: Rewind's NBD server (journaling every write) side by side with unprotected peers.

    .venv/bin/python -m bench.bench_nbd [--quick] [--runtime S] [--rounds N] [--dir DIR]

Part 1 (fio's nbd engine, one connection, a fresh sparse 1 GiB file per run, servers alternated in
one run, medians over rounds; PERFORMANCE.md says noise between runs is up to 2x, so only the ratios
mean anything): sequential 1 MiB writes QD8, 4 KiB random writes QD32, 4 KiB random reads QD32 of
the live volume, and of a past point (at=seq:N right after filling; then 1/4 of the blocks rewritten)
-- against nbdkit's file plugin and qemu-nbd (writeback).

Part 2 (the engine alone): journal N random 4 KiB writes through store.live.write_many in batches
of 32, then time 1 MiB reads at random past points: first right after the burst, while it is
still written back (shown, no target: a read that misses the page cache waits behind gigabytes of
writes in the disk's queue), then cold, from a reopened store whose files were dropped from the page
cache (the target). Last, compare journal + maps on disk with the bytes written.

Targets (issue 3): seq >= 0.8x nbdkit, randwrite >= 0.5x nbdkit, past read >= 0.7x live read,
past 1 MiB read < 50 ms, journal + maps < 1.15x bytes written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

GiB = 1024**3
MiB = 1024**2

REWIND = [sys.executable, "-m", "rewind.engine"]


# --- helpers ---------------------------------------------------------------------------------
def bench_root(arg: str | None) -> Path:
    """A scratch directory on a real disk (never tmpfs: the page cache would be the only disk)."""
    if arg:
        p = Path(arg)
        p.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="bench-nbd-", dir=p))
    base = Path(tempfile.gettempdir())
    if _fstype(base) in ("tmpfs", "ramfs"):
        base = Path.cwd() / ".bench-tmp"
        base.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="bench-nbd-", dir=base))


def _fstype(path: Path) -> str:
    best, kind = "", ""
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    return kind


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early ({proc.returncode}): {proc.args!r}")
        if path.exists():
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {path}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fio(uri: str, rw: str, bs: str, qd: int, runtime: float | None, size: str = "1g",
        extra: tuple[str, ...] = ()) -> dict[str, float]:
    """One fio job over NBD; returns MB/s and IOPS of its direction."""
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--size={size}", "--output-format=json", "--randrepeat=0", *extra]
    if runtime is not None:
        cmd += ["--time_based", f"--runtime={runtime:g}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr.strip() or p.stdout[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"mbs": side["bw_bytes"] / 1e6, "iops": side["iops"]}


def fill(uri: str) -> None:
    """Write every block once (1 MiB sequential), so reads are of data, not holes."""
    fio(uri, "write", "1m", 8, None)


def overwrite_quarter(uri: str) -> None:
    """Rewrite 1/4 of the volume at random 4 KiB blocks after the mark: the past point now
    differs from the live volume, so reading it needs the journal."""
    fio(uri, "randwrite", "4k", 32, None, size="1g", extra=("--io_size=256m", "--norandommap"))


# --- servers ---------------------------------------------------------------------------------
class Server:
    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.image = work / "disk.img"
        self.sock = work / "nbd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def uri_for(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def mark(self, name: str) -> str | None:
        return None

    def cpu(self) -> float:
        """CPU seconds the server process has used (all its threads), from /proc."""
        if self.proc is None:
            return 0.0
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Rewind(Server):
    name = "rewind"

    def start(self) -> None:
        store = self.work / "store"
        subprocess.run([*REWIND, "protect", str(self.image), "--store", str(store), "--size", "1G"],
                       check=True, capture_output=True)
        self.proc = subprocess.Popen([*REWIND, "serve", str(store), "--nbd", f"unix:{self.sock}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("ready"):
            raise RuntimeError(f"rewind serve did not start: {line!r}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGINT)
            self.proc = None

    def mark(self, name: str) -> str | None:
        """The export name of the present point, at=seq:N (asked of the running serve)."""
        p = subprocess.run([*REWIND, "log", str(self.work / "store"), "--json"], check=True,
                           capture_output=True, text=True)
        return f"at=seq:{json.loads(p.stdout)['head']['seq']}"


class Nbdkit(Server):
    name = "nbdkit"

    def start(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(GiB)
        self.proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "file",
                                      str(self.image)], stderr=subprocess.DEVNULL)
        wait_socket(self.sock, self.proc)


class QemuNbd(Server):
    name = "qemu-nbd"

    def start(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(GiB)
        self.proc = subprocess.Popen(["qemu-nbd", "-t", "-k", str(self.sock), "-f", "raw", "--cache=writeback",
                                      str(self.image)], stderr=subprocess.DEVNULL)
        wait_socket(self.sock, self.proc)


class Passthrough(Server):
    """Our NBD server over a plain file, no journal: what the server alone costs (bench only)."""

    name = "nbd-only"

    def start(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(GiB)
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.bench_nbd", "--serve-passthrough",
                                      str(self.image), str(self.sock)], stderr=subprocess.DEVNULL)
        wait_socket(self.sock, self.proc)


class _FileVolume:
    """A raw file as a live volume with the engine's method names; no history, no checks."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.block_size = 4096
        self.live = self

    def read(self, off: int, n: int) -> bytes:
        return os.pread(self.fd, n, off)

    def write_many(self, reqs: list[tuple[str, int, bytes | memoryview | int]], fua: bool = False) -> None:
        for kind, off, x in reqs:
            if kind == "write":
                assert not isinstance(x, int)
                os.pwrite(self.fd, x, off)
            else:
                assert isinstance(x, int)
                os.pwrite(self.fd, bytes(x), off)
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def at(self, point: str | int) -> _FileVolume:
        from rewind.engine.errors import PointError

        raise PointError("no history in the pass-through server")

    def marks(self) -> list[object]:
        return []


def serve_passthrough(image: str, sock: str) -> int:
    from rewind.engine.frontends.nbd.server import serve

    serve(_FileVolume(image), f"unix:{sock}")
    return 0


@contextlib.contextmanager
def running(cls: type[Server], root: Path) -> Iterator[Server]:
    work = Path(tempfile.mkdtemp(prefix=cls.name + "-", dir=root))
    srv = cls(work)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


# --- part 1: fio -----------------------------------------------------------------------------
def settle(s: Server, timeout: float = 30.0) -> None:
    """Start every measured run from a quiet machine: dirty pages written back and the server
    idle (a backlog left by the previous run would otherwise be charged to the next one)."""
    os.sync()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0 = s.cpu()
        time.sleep(0.25)
        if s.cpu() - c0 < 0.01:
            return


def append_ceiling(root: Path, runtime: float, streams: int = 1) -> float:
    """MB/s of fio appending 1 MiB writes to new plain files on the same disk for the same time
    (psync, no NBD, no journal), from `streams` threads at once (one file each). Keeping every
    write means writing every byte to disk once at least: over a sustained run no journal can beat
    the many-stream figure, whatever the server in front of it."""
    os.sync()
    try:
        cmd = ["fio", "--name=append", "--ioengine=psync", f"--directory={root}",
               "--filename_format=append-ceiling.$jobnum", f"--numjobs={streams}", "--group_reporting",
               "--rw=write", "--bs=1m", "--size=64g", "--fallocate=none", "--time_based", f"--runtime={runtime:g}",
               "--output-format=json"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"fio failed: {p.stderr.strip() or p.stdout[-500:]}")
        return float(json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]["write"]["bw_bytes"]) / 1e6
    finally:
        for path in root.glob("append-ceiling.*"):
            with contextlib.suppress(OSError):
                path.unlink()


def fio_part(root: Path, runtime: float, rounds: int, servers: list[type[Server]],
             only: tuple[str, ...] = ("seq", "randwrite", "randread")) -> dict[str, dict[str, float]]:
    res: dict[str, dict[str, list[float]]] = {}

    def add(server: str, key: str, value: float) -> None:
        res.setdefault(key, {}).setdefault(server, []).append(value)

    workloads: list[tuple[str, Callable[[Server], None]]] = []

    def measured(s: Server, key: str, uri: str, rw: str, bs: str, qd: int) -> None:
        settle(s)
        c0, t0 = s.cpu(), time.monotonic()
        r = fio(uri, rw, bs, qd, runtime)
        c1, t1 = s.cpu(), time.monotonic()
        add(s.name, key, r["mbs"] if key == "seq" else r["iops"])
        if r["iops"] > 0:  # server CPU per request, all threads (2 cores: what it leaves fio matters)
            add(s.name, key + "_cpu", (c1 - c0) / (r["iops"] * (t1 - t0)) * 1e6)

    def seq(s: Server) -> None:
        measured(s, "seq", s.uri, "write", "1m", 8)

    def randwrite(s: Server) -> None:
        measured(s, "randwrite", s.uri, "randwrite", "4k", 32)

    def randread(s: Server) -> None:
        fill(s.uri)
        past = s.mark("filled")
        if past is not None:
            overwrite_quarter(s.uri)
        measured(s, "randread", s.uri, "randread", "4k", 32)
        if past is not None:
            measured(s, "pastread", s.uri_for(past), "randread", "4k", 32)

    workloads = [("seq 1M write QD8", seq), ("4k randwrite QD32", randwrite), ("4k randread QD32", randread)]
    workloads = [(t, fn) for t, fn in workloads if fn.__name__ in only]
    for r in range(rounds):
        order = servers if r % 2 == 0 else list(reversed(servers))
        for title, fn in workloads:
            for cls in order:
                t0 = time.monotonic()
                with running(cls, root) as s:
                    fn(s)
                print(f"  round {r + 1}/{rounds} {title:18} {cls.name:9} done in {time.monotonic() - t0:5.1f} s",
                      file=sys.stderr, flush=True)
            if fn is seq:
                add("append", "seq", append_ceiling(root, runtime))
                add("append4", "seq", append_ceiling(root, runtime, streams=4))
    return {k: {s: statistics.median(v) for s, v in per.items()} for k, per in res.items()}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_fio(m: dict[str, dict[str, float]], servers: list[str]) -> None:
    rows = [("seq", "seq 1 MiB write QD8", "MB/s", 0.8), ("randwrite", "4 KiB randwrite QD32", "IOPS", 0.5),
            ("randread", "4 KiB randread QD32 live", "IOPS", None), ("pastread", "4 KiB randread QD32 past", "IOPS", None)]
    head = f"{'workload':27} {'unit':5}" + "".join(f"{s:>11}" for s in servers) + f"{'vs nbdkit':>11}  target"
    print(head)
    print("-" * len(head) + "-------------")
    for key, title, unit, target in rows:
        vals = m.get(key, {})
        cells = "".join(f"{vals[s]:>11,.0f}" if s in vals else f"{'-':>11}" for s in servers)
        base = m.get("randread" if key == "pastread" else key, {}).get("nbdkit")
        ours = vals.get("rewind")
        ratio = f"{ours / base:10.2f}x" if base and ours else f"{'-':>11}"
        tgt = ""
        if target is not None and base and ours:
            tgt = f"  >= {target}x nbdkit: {verdict(ours / base >= target)}"
        if key == "pastread" and ours and m.get("randread", {}).get("rewind"):
            live = m["randread"]["rewind"]
            tgt = f"  past/live {ours / live:.2f}x >= 0.7x: {verdict(ours / live >= 0.7)}"
        print(f"{title:27} {unit:5}{cells}{ratio}{tgt}")
    seqs = m.get("seq", {})
    if seqs.get("append"):
        print()
        print("disk append ceiling: fio appending 1 MiB writes to new plain files on the same disk, same time")
        for key, what in (("append", "1 stream "), ("append4", "4 streams")):
            app = seqs.get(key)
            if not app:
                continue
            vs = f" = {app / seqs['nbdkit']:.2f}x nbdkit" if seqs.get("nbdkit") else ""
            ours = f"; rewind reaches {seqs['rewind'] / app:.2f}x of it" if seqs.get("rewind") else ""
            print(f"  {what}: {app:,.0f} MB/s{vs}{ours}")
        print("  every write kept means every byte written to disk at least once: no journal beats the 4-stream figure")
    print()
    print(f"{'server CPU per request':27} {'us':5}" + "".join(f"{s:>11}" for s in servers)
          + "   (user+sys of the server process, all threads, while fio ran)")
    for key, title, _unit, _target in rows:
        vals = m.get(key + "_cpu", {})
        if vals:
            print(f"{title:27} {'':5}" + "".join(f"{vals[s]:>11,.1f}" if s in vals else f"{'-':>11}" for s in servers))


# --- part 2: the engine ----------------------------------------------------------------------
def engine_part(root: Path, writes: int, vol_size: int, batch: int = 32, reads: int = 200) -> None:
    from rewind.engine.store import Store

    work = Path(tempfile.mkdtemp(prefix="engine-", dir=root))
    try:
        store = Store.create(work / "disk.img", work / "store", size=vol_size)
        bs = store.block_size
        nblocks = vol_size // bs
        rnd = random.Random(1)
        block = os.urandom(bs * 64)
        mv = memoryview(block)
        t0 = time.monotonic()
        done = 0
        while done < writes:
            k = min(batch, writes - done)
            reqs: list[tuple[str, int, bytes | memoryview | int]] = []
            for _ in range(k):
                j = rnd.randrange(64)
                reqs.append(("write", rnd.randrange(nblocks) * bs, mv[j * bs : (j + 1) * bs]))
            store.live.write_many(reqs)
            done += k
        store.live.flush()
        wt = time.monotonic() - t0
        written = writes * bs
        first, last = store.horizon, store.head

        def timed_reads(k: int) -> list[float]:
            lat: list[float] = []
            for _ in range(k):
                seq = rnd.randrange(first, last + 1)
                off = rnd.randrange(0, vol_size - MiB + 1)
                t = time.perf_counter()
                data = store.at(seq).read(off, MiB)
                lat.append((time.perf_counter() - t) * 1000)
                assert len(data) == MiB
            return sorted(lat)

        # right after the burst: the lazy applier and the checkpoint are still writing it back,
        # and a read that misses the page cache queues behind gigabytes of writeback on the disk
        busy = timed_reads(reads // 2)
        t = time.monotonic()
        store.close()
        os.sync()
        settle_s = time.monotonic() - t
        store = Store.open(work / "store")  # cold: no cached lookups, no SQLite pages in memory,
        _drop_cache(work)  # and every journal block, index page and primary block from the disk
        lat = timed_reads(reads)
        store.close()
        on_disk = _du(work / "store")
        p50, p95, mx = _pcts(lat)
        b50, b95, bmx = _pcts(busy)
        print(f"journaled {writes:,} random 4 KiB writes (batches of {batch}) into a {vol_size / GiB:g} GiB volume "
              f"in {wt:.1f} s: {writes / wt:,.0f} writes/s, {written / wt / 1e6:,.0f} MB/s")
        print(f"{len(busy)} reads of 1 MiB at random past points right after the burst, while it is written back: "
              f"p50 {b50:.1f} ms, p95 {b95:.1f} ms, max {bmx:.1f} ms   (no target)")
        print(f"then {settle_s:.1f} s to close the store and sync; reopened it and dropped its files from the page cache")
        print(f"{reads} reads of 1 MiB at random past points, cold: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {mx:.1f} ms"
              f"   target < 50 ms: {verdict(mx < 50)}")
        print(f"journal + maps on disk {on_disk / MiB:,.0f} MiB for {written / MiB:,.0f} MiB written: "
              f"{on_disk / written:.3f}x   target < 1.15x: {verdict(on_disk / written < 1.15)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pcts(lat: list[float]) -> tuple[float, float, float]:
    """p50, p95 and max of sorted latencies."""
    return lat[len(lat) // 2], lat[max(0, int(len(lat) * 0.95) - 1)], lat[-1]


def _drop_cache(root: Path) -> None:
    """Evict every file under root from the page cache (they are synced: nothing is lost)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _du(path: Path) -> int:
    """Bytes allocated on disk (like du), so sparse files count what they really use."""
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            st = p.lstat()
            if p.is_file():
                total += st.st_blocks * 512
    return total


# --- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.bench_nbd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run: 2 s fio runs, 1 round, 100k writes")
    ap.add_argument("--runtime", type=float, help="seconds per fio run (default 8, quick 2)")
    ap.add_argument("--rounds", type=int, help="rounds per server; medians are printed (default 2, quick 1)")
    ap.add_argument("--writes", type=int, help="engine part: 4 KiB writes to journal (default 1,000,000)")
    ap.add_argument("--volume", type=float, help="engine part: volume size in GiB (default 4, quick 1)")
    ap.add_argument("--dir", help="scratch directory on a real disk (default: $TMPDIR unless tmpfs)")
    ap.add_argument("--only", choices=["fio", "engine"], help="run one part")
    ap.add_argument("--workloads", default="seq,randwrite,randread",
                    help="fio part: which runs, comma separated (default seq,randwrite,randread)")
    ap.add_argument("--no-passthrough", action="store_true", help="skip the nbd-only column (server, no journal)")
    ap.add_argument("--serve-passthrough", nargs=2, metavar=("IMAGE", "SOCK"), help=argparse.SUPPRESS)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.serve_passthrough:
        return serve_passthrough(*args.serve_passthrough)
    runtime = args.runtime or (2.0 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 2)
    writes = args.writes or (100_000 if args.quick else 1_000_000)
    volume = int((args.volume or (1 if args.quick else 4)) * GiB)
    if runtime <= 0 or rounds <= 0 or writes <= 0 or volume < 2 * MiB:
        print("bench_nbd: --runtime, --rounds, --writes and --volume must be positive", file=sys.stderr)
        return 2
    root = bench_root(args.dir)
    try:
        if args.only in (None, "fio"):
            servers: list[type[Server]] = [Rewind]
            missing = [t for t in ("fio", "nbdkit", "qemu-nbd") if shutil.which(t) is None]
            if "fio" in missing:
                print("bench_nbd: fio is not installed: skipping the NBD part (apt install fio)")
            else:
                servers += [c for c in (Nbdkit, QemuNbd) if shutil.which(c.name)]
                if not args.no_passthrough:
                    servers.append(Passthrough)
                print(f"NBD, fio nbd engine, 1 connection, fresh sparse 1 GiB file per run, {runtime:g} s runs, "
                      f"median of {rounds} round(s), servers alternated; scratch in {root}", flush=True)
                m = fio_part(root, runtime, rounds, servers, tuple(args.workloads.split(",")))
                print()
                print_fio(m, [s.name for s in servers])
                print()
        if args.only in (None, "engine"):
            print("Engine, in process:", flush=True)
            engine_part(root, writes, volume)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
