"""The space limit holds while serving (issue 13, item 9): with `--on-full fade` and the
background retention that serve runs, a steady writer never takes the journal past max-size by
more than a segment or so, and every point retention keeps still reads exactly."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import rewind_serve
from rewind.engine.journal.record import Kind
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
        fades: list[dict] = []
        s.add_listener(lambda ev, data: fades.append(data) if ev == "faded-early" else None)
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
              f" horizon seq {s.horizon} of {s.head}, {len(fades)} early fades")
        assert 1 <= len(fades) <= 2  # the console hears of it, but not of every step
        assert (tmp_path / "st" / "store.json").stat().st_size < 16 << 10
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


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) is not installed")
def test_serve_keeps_the_limit_under_nbd_writes(tmp_path: Path) -> None:
    """The issue's case: `rewind serve` with --max-size, a client writing steadily over NBD."""
    limit, size, chunk = 32 * MiB, 8 * MiB, MiB
    st = tmp_path / "st"
    rewind = Path(sys.executable).with_name("rewind")
    base = [str(rewind)] if rewind.exists() else [sys.executable, "-m", "rewind.engine"]
    subprocess.run([*base, "protect", str(tmp_path / "disk.img"), "--store", str(st), "--size", str(size)],
                   check=True, capture_output=True)
    subprocess.run([*base, "retention", str(st), "--max-size", str(limit)], check=True, capture_output=True)
    sock = tmp_path / "nbd.sock"
    writes: list[tuple[int, int]] = []  # (offset, pattern byte), one NBD request = one record each
    samples: list[int] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append(_journal_disk_bytes(st / "journal"))
            time.sleep(0.01)

    rnd = random.Random(5)
    with rewind_serve(st, sock):
        th = threading.Thread(target=sampler)
        th.start()
        try:
            t_end = time.monotonic() + 12
            while time.monotonic() < t_end:
                cmds: list[str] = []
                for _ in range(32):
                    off, pat = rnd.randrange(size // chunk) * chunk, rnd.randrange(1, 256)
                    writes.append((off, pat))
                    cmds += ["-c", f"write -P {pat} {off} {chunk}"]
                subprocess.run(["qemu-io", "-f", "raw", f"nbd+unix:///?socket={sock}", *cmds],
                               check=True, capture_output=True)
        finally:
            stop.set()
            th.join()
    most = max(samples)
    print(f"\nserve: {len(writes)} MiB written over NBD under a {limit // MiB} MiB limit;"
          f" the journal peaked at {most / MiB:.1f} MiB")
    assert len(writes) * chunk >= 3 * limit, "the client was too slow to test the limit"
    assert most <= limit + limit // 8, f"journal reached {most / MiB:.1f} MiB"
    s = Store.open(st)
    try:
        # the records after the horizon are the last writes, in order (baselines, taken again
        # after a fade released blocks, have seqs but no records): each is a point to check
        assert s.horizon > 0
        rows = [(int(q), int(b)) for q, b in s._db.db.execute(
            "SELECT seq, block FROM records WHERE seq > ? AND kind = ? ORDER BY seq", (s.horizon, int(Kind.WRITE)))]
        first = len(writes) - len(rows)
        assert rows and first > 0
        assert [b * 4096 for _, b in rows] == [off for off, _ in writes[first:]]
        model = bytearray(size)
        for off, pat in writes[:first]:
            model[off : off + chunk] = bytes([pat]) * chunk
        assert s.at(s.horizon).read(0, size) == model  # the horizon: the write before the first kept
        check = set(random.Random(2).sample(range(len(rows)), min(20, len(rows)))) | {len(rows) - 1}
        for i, (seq, _) in enumerate(rows):
            off, pat = writes[first + i]
            model[off : off + chunk] = bytes([pat]) * chunk
            if i in check:
                assert s.at(seq).read(0, size) == model, f"seq {seq}"
        assert s.live.read(0, size) == model
    finally:
        s.close()
