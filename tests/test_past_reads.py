"""Past reads take shortcuts: blocks unchanged since a point come from the primary (the last-write
array), lookups are cached, and a front end's queue of reads is answered with one read_many.
Each shortcut must give what the plain model says, at every point, also across fades, reopens
and writes that race the read."""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refmodel import Clock, Model
from rewind.engine import applier
from rewind.engine.errors import PointError
from rewind.engine.store import Store

BS = 4096
NB = 64
SIZE = NB * BS


def _requests(rnd: random.Random, n: int) -> list[tuple[int, int]]:
    reqs = []
    for _ in range(n):
        k = rnd.random()
        if k < 0.6:  # one whole block, the common NBD read
            reqs.append((rnd.randrange(NB) * BS, BS))
        elif k < 0.8:  # part of one block
            off = rnd.randrange(SIZE - 1)
            reqs.append((off, rnd.randrange(1, min(BS, SIZE - off) + 1)))
        elif k < 0.95:  # a run of blocks, unaligned
            off = rnd.randrange(SIZE - 1)
            reqs.append((off, rnd.randrange(1, SIZE - off + 1)))
        else:  # bad: outside the volume, or empty
            reqs.append(rnd.choice([(SIZE, BS), (SIZE - 10, 20), (0, 0)]))
    return reqs


def _check_point(s: Store, seq: int, want: bytes, rnd: random.Random) -> None:
    v = s.at(seq)
    v.warm()  # not joined: the lookups race the reads, writes and fades that follow
    reqs = _requests(rnd, 40)
    got = v.read_many(reqs)
    for (off, n), g in zip(reqs, got, strict=True):
        if off + n > SIZE:
            assert isinstance(g, Exception), f"seq {seq}: read {off}+{n} outside the volume must fail"
            continue
        assert g == want[off : off + n], f"seq {seq}: read_many {off}+{n} differs from the model"
        assert v.read(off, n) == g, f"seq {seq}: read and read_many differ at {off}+{n}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), fade_at=st.integers(0, 3), reopen=st.booleans())
def test_read_many_matches_model_at_every_point(seed: int, fade_at: int, reopen: bool) -> None:
    rnd = random.Random(seed)
    d = Path(tempfile.mkdtemp())
    clock = Clock()
    m = Model(SIZE)
    prefill = seed % 2 == 1
    if prefill:  # data before protection: its blocks come from baselines or the primary
        pre = rnd.randbytes(SIZE)
        (d / "disk.img").write_bytes(pre)
        m.write(0, pre)
    s = Store.create(d / "disk.img", d / "store", size=None if prefill else SIZE, block_size=BS, clock=clock)
    m.snap(s.head)
    s.set_retention(policy="1m:all,10m:1m")  # minutes of history here: fades really merge
    try:
        for step in range(4):
            for _ in range(rnd.randrange(1, 12)):
                b = rnd.randrange(NB)
                if rnd.random() < 0.15:
                    n = rnd.randrange(1, 4) * BS
                    off = min(b * BS, SIZE - n)
                    s.live.zero(off, n)
                    m.zero(off, n)
                else:
                    n = rnd.randrange(1, 3 * BS)
                    off = rnd.randrange(SIZE - n)
                    data = rnd.randbytes(n)
                    s.live.write(off, data)
                    m.write(off, data)
                m.snap(s.head)
                clock.advance(rnd.uniform(0.5, 90))
            if step == fade_at:
                s.mark(f"m{step}")
                s.fade().run()
            if reopen and step == 2:
                s.close()
                s = Store.open(d / "store", clock=clock)
            for seq, want in m.points.items():
                try:
                    _check_point(s, seq, want, rnd)
                except PointError:
                    pass  # merged away by the fade: refused, never wrong
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("lazy_bytes", [0, applier.LAZY_BYTES])
def test_past_reads_race_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lazy_bytes: int) -> None:
    """Readers of a past point while writers overwrite the same blocks: the shortcut that reads
    the primary must notice a write staged meanwhile and fall back to the journal. With an eager
    applier (0) the primary is overwritten at once, so a missing re-check shows."""
    monkeypatch.setattr(applier, "LAZY_BYTES", lazy_bytes)
    s = Store.create(tmp_path / "disk.img", tmp_path / "store", size=SIZE)
    rnd = random.Random(7)
    base = rnd.randbytes(SIZE)
    s.live.write(0, base)
    point = s.head
    stop = threading.Event()
    errors: list[str] = []
    pread = s._primary.pread

    def slow_pread(off: int, n: int) -> bytes:  # widen the window between check and read
        time.sleep(0.0002)
        return pread(off, n)

    monkeypatch.setattr(s._primary, "pread", slow_pread)

    def writer() -> None:
        r = random.Random(1)
        while not stop.is_set():
            b = r.randrange(NB)
            s.live.write_many([("write", b * BS, r.randbytes(BS)) for _ in range(3)])

    def reader(k: int) -> None:
        r = random.Random(100 + k)
        v = s.at(point)
        for _ in range(300):
            reqs = [(r.randrange(NB) * BS, BS) for _ in range(16)]
            for (off, n), g in zip(reqs, v.read_many(reqs), strict=True):
                if g != base[off : off + n]:
                    errors.append(f"block {off // BS} read wrong data at the point")
            off = r.randrange(NB) * BS
            if v.read(off, BS) != base[off : off + BS]:
                errors.append(f"block {off // BS}: read wrong data at the point")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    s.close()
    assert not errors, errors[:5]


def test_warm_fills_the_lookup_cache(tmp_path: Path) -> None:
    """A served past point has its changed blocks looked up in advance, with the answers a read
    would get."""
    s = Store.create(tmp_path / "disk.img", tmp_path / "store", size=SIZE)
    rnd = random.Random(3)
    base = rnd.randbytes(SIZE)
    s.live.write(0, base)
    point = s.head
    changed = sorted(rnd.sample(range(NB), 20))
    for b in changed:
        s.live.write(b * BS, rnd.randbytes(BS))
    s.live.write(changed[0] * BS, rnd.randbytes(BS))  # two versions after the point
    s.live.flush()
    s._index_sync()
    s.at(point).warm()
    assert s._warmer is not None
    s._warmer.join()
    cached = sorted(b for b, q in s._vcache if q == point)
    assert cached == changed, "every block written since the point is looked up, and only those"
    for b in changed:
        assert s._vcache[(b, point)] == s._db.newest(b, point)
    assert s.at(point).read(0, SIZE) == base
    s.close()
