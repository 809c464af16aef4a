"""Model-based tests: random write histories against a plain reference, at every recorded point."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refmodel import Clock, Model
from rewind.engine.errors import BadInput, Cancelled, PointError, ReadOnlyError
from rewind.engine.store import Store

BS = 512
NBLOCKS = 48
SIZE = BS * NBLOCKS

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 4 * BS), st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 8 * BS), st.just(0)),
    st.tuples(st.just("trim"), st.integers(0, SIZE - 1), st.integers(1, 8 * BS), st.just(0)),
    st.tuples(st.just("batch"), st.integers(0, SIZE - 1), st.integers(1, 3 * BS), st.integers(0, 255)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("mark"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("tick"), st.just(0), st.just(0), st.integers(1, 120)),
)


def check_all_points(s: Store, m: Model) -> None:
    for seq, ref in m.points.items():
        assert s.at(seq).read(0, SIZE) == ref, f"seq {seq}"
    assert s.live.read(0, SIZE) == bytes(m.cur)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=40), prefill=st.booleans())
def test_every_point_matches_model(ops: list[tuple[str, int, int, int]], prefill: bool) -> None:
    tmp = Path(tempfile.mkdtemp())
    try:
        clock = Clock()
        m = Model(SIZE)
        if prefill:  # a primary with data before protection: baselines must capture it
            pre = bytes(random.Random(7).randrange(256) for _ in range(SIZE))
            (tmp / "disk.img").write_bytes(pre)
            m.write(0, pre)
        s = Store.create(tmp / "disk.img", tmp / "st", size=None if prefill else SIZE, block_size=BS, clock=clock)
        m.snap(s.head)
        nmarks = 0
        for kind, off, n, v in ops:
            n = min(n, SIZE - off)
            if kind == "write":
                data = bytes((v + i) % 256 for i in range(n))
                s.live.write(off, data)
                m.write(off, data)
            elif kind in ("zero", "trim"):
                getattr(s.live, kind)(off, n)
                m.zero(off, n)
            elif kind == "batch":
                data = bytes([v]) * n
                off2 = (off * 7) % (SIZE - BS)
                s.live.write_many([("write", off, data), ("zero", off2, BS), ("write", off2 + 3, b"xyz")])
                m.write(off, data)
                m.zero(off2, BS)
                m.write(off2 + 3, b"xyz")
            elif kind == "flush":
                s.live.flush()
            elif kind == "mark":
                nmarks += 1
                s.mark(f"m{nmarks}")
            elif kind == "reopen":
                s.close()
                s = Store.open(tmp / "st", clock=clock)
            elif kind == "tick":
                clock.advance(v)
            m.snap(s.head)
        check_all_points(s, m)
        for i in range(1, nmarks + 1):
            seq = s.resolve(f"mark:m{i}")
            assert s.at(f"mark:m{i}").read(0, SIZE) == m.points[seq]
        # diff between two random points says exactly which blocks differ
        seqs = sorted(m.points)
        a, b = seqs[0], seqs[-1]
        want = [blk for blk in range(NBLOCKS) if m.points[a][blk * BS : (blk + 1) * BS] != m.points[b][blk * BS : (blk + 1) * BS]]
        assert s.changed_blocks(a, b) == want
        s.close()
        s = Store.open(tmp / "st", clock=clock)
        check_all_points(s, m)
        assert s.verify().run() == []
        s.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_maps_rebuilt_from_journal(tmp_path: Path, clock: Clock) -> None:
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=64 * 4096, clock=clock)
    m = Model(64 * 4096)
    rnd = random.Random(3)
    m.snap(s.head)
    for i in range(200):
        off, n = rnd.randrange(0, 60 * 4096), rnd.randrange(1, 4 * 4096)
        data = rnd.randbytes(n)
        s.live.write(off, data)
        m.write(off, data)
        clock.advance(1)
        if i == 100:
            s.mark("half")
        m.snap(s.head)
    s.close()
    for f in tmp_path.glob("st/maps.db*"):
        f.unlink()
    s = Store.open(tmp_path / "st", clock=clock)
    for seq, ref in m.points.items():
        assert s.at(seq).read(0, 64 * 4096) == ref
    assert [x.name for x in s.marks()] == ["half"]
    s.close()


def test_points_by_time_relative_and_errors(store: Store, clock: Clock) -> None:
    store.live.write(0, b"a" * 4096)
    t1 = clock()
    clock.advance(60)
    store.live.write(0, b"b" * 4096)
    clock.advance(60)
    assert store.at("-90s").read(0, 1) == b"a"
    assert store.at("-30s").read(0, 1) == b"b"
    from datetime import datetime

    iso = datetime.fromtimestamp(t1 / 1e9).astimezone().isoformat()
    assert store.at(iso).read(0, 1) == b"a"
    for bad in ("yesterday", "seq:999", "mark:none", "seq:-1", "-5x", "", "-3d"):
        with pytest.raises(PointError):
            store.resolve(bad)
    with pytest.raises(ReadOnlyError):
        store.at("seq:1").write(0, b"x")
    with pytest.raises(BadInput):
        store.live.write(store.size - 1, b"xy")
    with pytest.raises(BadInput):
        store.mark("bad/name")
    store.mark("ok")
    with pytest.raises(BadInput):
        store.mark("ok")


def test_export_cancel_leaves_nothing(store: Store, tmp_path: Path) -> None:
    store.live.write(0, b"z" * store.size)
    job = store.export("now", tmp_path / "out.img")
    it = iter(job)
    job.cancel()
    with pytest.raises(Cancelled):
        for _ in it:
            pass
    assert job.state == "cancelled"
    assert not (tmp_path / "out.img").exists()
    assert not list(tmp_path.glob(".out.img*"))
