"""The applier writes the primary lazily: during a burst the live volume reads unapplied blocks
from the journal, a block written again before its turn lands on the primary once, and nothing
depends on the primary having caught up: reads, read-modify-writes, a crash and its redo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refmodel import Clock, Model
from rewind.engine import applier
from rewind.engine.store import Store

BS = 4096
NBLOCKS = 64
SIZE = NBLOCKS * BS


@pytest.fixture
def burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst that never pauses: the applier holds everything until it is asked."""
    monkeypatch.setattr(applier, "LAZY_IDLE_S", 3600.0)


def test_live_reads_come_from_the_journal_until_the_primary_catches_up(tmp_path: Path, burst: None) -> None:
    img = tmp_path / "disk.img"
    s = Store.create(img, tmp_path / "st", size=SIZE, clock=Clock())
    try:
        m = Model(SIZE)
        for i in range(200):  # block 3 written 50 times, the rest spread, one unaligned write
            off = (3 if i % 4 == 0 else (i * 7) % NBLOCKS) * BS
            data = bytes([i % 251 + 1]) * BS
            s.live.write(off, data)
            m.write(off, data)
        s.live.write(5 * BS + 100, b"unaligned")  # a read-modify-write of an unapplied block
        m.write(5 * BS + 100, b"unaligned")
        s.live.zero(9 * BS, 2 * BS)
        m.zero(9 * BS, 2 * BS)
        s.flush()  # durable in the journal; the primary need not have them
        assert s._applier.lagging
        assert img.read_bytes() != bytes(m.cur)
        assert s.live.read(0, SIZE) == bytes(m.cur)
        assert all(s.live.read(b * BS, BS) == m.cur[b * BS : (b + 1) * BS] for b in range(NBLOCKS))

        s.flush(primary=True)  # the image on its own is whole now
        assert not s._applier.lagging
        assert img.read_bytes() == bytes(m.cur)
        assert s._applier.skipped >= 49  # block 3's earlier writes never reached the primary
        assert s.live.read(0, SIZE) == bytes(m.cur)
    finally:
        s.close()


def test_a_crash_with_writes_not_applied_loses_none_of_them(tmp_path: Path) -> None:
    img, st_dir = tmp_path / "disk.img", tmp_path / "st"
    Store.create(img, st_dir, size=SIZE).close()
    script = textwrap.dedent(
        f"""
        import os
        from rewind.engine import applier
        from rewind.engine.store import Store
        applier.LAZY_IDLE_S = 3600.0
        s = Store.open({str(st_dir)!r})
        for i in range(300):
            s.live.write(((i * 5) % {NBLOCKS}) * {BS}, bytes([i % 250 + 1]) * {BS})
        s.live.flush()
        assert s._applier.lagging
        os._exit(0)  # kill: no close, the queued primary writes are lost
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    m = Model(SIZE)
    for i in range(300):
        m.write(((i * 5) % NBLOCKS) * BS, bytes([i % 250 + 1]) * BS)
    s = Store.open(st_dir)
    try:
        assert s.live.read(0, SIZE) == bytes(m.cur)
    finally:
        s.close()
    assert img.read_bytes() == bytes(m.cur)


op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 3 * BS), st.integers(1, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 3 * BS), st.just(0)),
    st.tuples(st.just("drain"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=40), lazy_kib=st.sampled_from([8, 64, 1 << 20]))
def test_random_histories_while_the_applier_lags(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, ops: list[tuple[str, int, int, int]],
    lazy_kib: int,
) -> None:
    """Every point, the live volume and finally the primary itself equal the model, whether the
    applier drains often (a small LAZY_BYTES), now and then, or only when asked."""
    monkeypatch.setattr(applier, "LAZY_IDLE_S", 3600.0)
    monkeypatch.setattr(applier, "LAZY_BYTES", lazy_kib << 10)
    d = tmp_path_factory.mktemp("lazy")
    img = d / "disk.img"
    clock = Clock()
    s = Store.create(img, d / "st", size=SIZE, clock=clock)
    m = Model(SIZE)
    m.snap(s.head)
    try:
        for kind, off, n, byte in ops:
            n = min(n, SIZE - off)
            if kind == "write":
                data = bytes([byte]) * n
                s.live.write(off, data)
                m.write(off, data)
            elif kind == "zero":
                s.live.zero(off, n)
                m.zero(off, n)
            elif kind == "drain":
                s.flush(primary=True)
                assert img.read_bytes() == bytes(m.cur)
            else:
                s.close()
                assert img.read_bytes() == bytes(m.cur)
                s = Store.open(d / "st", clock=clock)
            m.snap(s.head)
            clock.advance(1)
            assert s.live.read(0, SIZE) == bytes(m.cur)
        every_point_then_the_image(s, m, img)
    finally:
        s.close()


def every_point_then_the_image(s: Store, m: Model, img: Path) -> None:
    """Every recorded point reads as the model, and once the applier is drained, so does the file."""
    for q, want in m.points.items():
        assert s.at(q).read(0, SIZE) == want, f"seq {q}"
    s.flush(primary=True)
    assert img.read_bytes() == bytes(m.cur)


def test_seqs_past_32_bits_read_right_while_the_applier_lags(tmp_path: Path, burst: None) -> None:
    """The last-write array keeps 32-bit seqs; past 2**32 it says "unknown" (LAST_NONE) and reads
    must ask the index, not the primary the lazy applier has not written yet."""
    img = tmp_path / "disk.img"
    clock = Clock()
    s = Store.create(img, tmp_path / "st", size=SIZE, clock=clock)
    try:
        s._head = s._applier.applied = (1 << 32) + 7  # as after four billion writes
        m = Model(SIZE)
        m.snap(s.head)
        for i in range(30):
            off = ((i * 11) % NBLOCKS) * BS
            s.live.write(off, bytes([i + 1]) * BS)
            m.write(off, bytes([i + 1]) * BS)
            m.snap(s.head)
            clock.advance(1)
        assert s._applier.lagging
        assert s.live.read(0, SIZE) == bytes(m.cur)
        assert all(s.live.read(b * BS, BS) == m.cur[b * BS : (b + 1) * BS] for b in range(NBLOCKS))
        every_point_then_the_image(s, m, img)
    finally:
        s.close()
