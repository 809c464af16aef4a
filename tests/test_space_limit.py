"""The space limit holds while serving (issue 13, item 9): with `--on-full fade` and the
background retention that serve runs, a steady writer never takes the journal past max-size by
more than a segment or so, and every point retention keeps still reads exactly."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

from rewind.engine.store import Store

BS = 4096
MiB = 1 << 20


def _data(i: int, n: int) -> bytes:
    return random.Random(i).randbytes(n)


def _journal_disk_bytes(d: Path) -> int:
    """What the journal takes on disk, compaction copies included."""
    total = 0
    for e in os.scandir(d):
        try:
            total += e.stat().st_size
        except FileNotFoundError:
            pass  # deleted or renamed by a fade meanwhile
    return total


def test_steady_writer_stays_within_the_limit(tmp_path: Path) -> None:
    limit = 32 * MiB
    size = 8 * MiB
    s = Store.create(tmp_path / "disk.img", tmp_path / "st", size=size)
    log: list[tuple[int, int, int, int]] = []  # (seq after the write, offset, length, seed)
    samples: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    try:
        s.set_retention(max_size=limit)  # on_full defaults to fade
        s.start_retention()  # what serve does
        seg = limit // 8  # a segment or so: segments are at most this under the limit

        def sampler() -> None:
            while not stop.is_set():
                samples.append(_journal_disk_bytes(tmp_path / "st" / "journal"))
                time.sleep(0.01)

        def writer() -> None:
            rnd = random.Random(7)
            i = 0
            try:
                t_end = time.monotonic() + 15
                while time.monotonic() < t_end:
                    i += 1
                    n = rnd.choice((1, 4, 16, 64)) * BS
                    off = rnd.randrange(0, size - n + 1, BS)
                    s.live.write(off, _data(i, n))
                    log.append((s.head, off, n, i))
                    if i % 64 == 0:
                        s.flush()
            except BaseException as e:  # reported below
                errors.append(e)

        th = [threading.Thread(target=sampler), threading.Thread(target=writer)]
        for t in th:
            t.start()
        th[1].join()
        stop.set()
        th[0].join()
        assert not errors, errors
        written = sum(n for _, _, n, _ in log)
        most = max(samples)
        print(f"\nwrote {written / MiB:.0f} MiB in 15 s under a {limit / MiB:.0f} MiB limit"
              f" (segments {seg / MiB:.0f} MiB): the journal peaked at {most / MiB:.1f} MiB,"
              f" horizon seq {s.horizon} of {s.head}")
        assert written >= 3 * limit, "the writer was too slow to test the limit"
        assert s.horizon > 0, "nothing faded"
        assert most <= limit + seg, f"journal reached {most / MiB:.1f} MiB, limit {limit / MiB:.0f} MiB + a segment"

        # every retained point reads as the reference says (replayed from the write log); lift
        # the limit and let a running fade finish first, so the points checked stay
        s.set_retention(max_size=0)
        with s._maint:
            pass
        s._index_sync()
        pts = sorted({seq for seq, _ in s._db.points(s.horizon - 1)} | {s.horizon, s.head})
        rnd = random.Random(1)
        check = sorted({pts[0], pts[-1], *rnd.sample(pts, min(25, len(pts)))})
        model = bytearray(size)
        k = 0
        for seq in check:
            while k < len(log) and log[k][0] <= seq:
                _, off, n, i = log[k]
                model[off : off + n] = _data(i, n)
                k += 1
            assert s.at(seq).read(0, size) == model, f"seq {seq}"
        for _, off, n, i in log[k:]:
            model[off : off + n] = _data(i, n)
        assert s.live.read(0, size) == model
        assert s.verify().run() == []
    finally:
        stop.set()
        s.close()
