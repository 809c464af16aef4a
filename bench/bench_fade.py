"""Fade benchmark (issue 4): fade a journal of 1,000,000 4 KiB writes, and measure what it costs
foreground writes while it runs.

A month of history is simulated with a controllable clock (writes spread over 31 days), then the
default policy (24h:all,7d:1h,30d:1d) is applied by the same background fade `serve` runs, while a
foreground thread keeps writing random 4 KiB blocks. Reported: fade time (target < 30 s), and
foreground write IOPS during the fade as a ratio of IOPS without it (target >= 0.5).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from rewind.engine.store import Store

BS = 4096


class Clock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def foreground(store: Store, seconds: float, stop: threading.Event | None = None) -> float:
    """Random 4 KiB writes in batches of 32 (as the NBD server sends them); returns IOPS."""
    rnd = random.Random(2)
    buf = os.urandom(BS)
    nblocks = store.size // BS
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not (stop and stop.is_set()):
        store.live.write_many([("write", rnd.randrange(nblocks) * BS, buf) for _ in range(32)])
        n += 32
    return n / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="100k writes instead of 1M")
    ap.add_argument("--writes", type=int, default=0)
    ap.add_argument("--dir", default=os.environ.get("REWIND_BENCH_DIR", ""))
    args = ap.parse_args()
    n = args.writes or (100_000 if args.quick else 1_000_000)
    base = Path(args.dir or tempfile.mkdtemp(prefix="rewind-fade-", dir=Path(__file__).parent.parent))
    base.mkdir(parents=True, exist_ok=True)
    try:
        size = 4 << 30
        clock = Clock(1_800_000_000 * 10**9)
        store = Store.create(base / "disk.img", base / "st", size=size, clock=clock)
        step = 31 * 86400 * 10**9 // n
        rnd = random.Random(1)
        buf = os.urandom(BS)
        t0 = time.monotonic()
        for i in range(0, n, 256):
            store.live.write_many([("write", rnd.randrange(size // BS) * BS, buf) for _ in range(min(256, n - i))])
            clock.t += step * 256
        store.flush()
        store._index_sync()
        print(f"journaled {n:,} 4 KiB writes over a simulated month in {time.monotonic() - t0:.1f} s")
        jb = store.journal.size_bytes()
        base_iops = foreground(store, 4.0)
        result: dict[str, object] = {}
        stop = threading.Event()

        def fade() -> None:
            t = time.monotonic()
            result.update(store.fade(throttle=0.002).run())
            result["wall"] = time.monotonic() - t
            stop.set()

        th = threading.Thread(target=fade)
        th.start()
        during = foreground(store, 600.0, stop)
        th.join()
        wall = float(result["wall"])  # type: ignore[arg-type]
        ratio = during / base_iops
        print(f"{'measure':<44}{'value':>14}{'target':>12}  verdict")
        print(f"{'fade time (s)':<44}{wall:>14.1f}{'< 30':>12}  {'PASS' if wall < 30 else 'MISS'}")
        print(f"{'foreground 4K write IOPS without fade':<44}{base_iops:>14,.0f}")
        print(f"{'foreground 4K write IOPS during fade':<44}{during:>14,.0f}")
        print(f"{'ratio during/without':<44}{ratio:>14.2f}{'>= 0.5':>12}  {'PASS' if ratio >= 0.5 else 'MISS'}")
        print(f"{'journal bytes before / after':<44}{jb:>14,} -> {store.journal.size_bytes():,}")
        print(f"points dropped {result.get('points_dropped')}, versions removed {result.get('versions_removed')},"
              f" blocks released {result.get('blocks_released')}, segments deleted {result.get('segments_deleted')},"
              f" compacted {result.get('segments_compacted')}")
        store.close()
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
