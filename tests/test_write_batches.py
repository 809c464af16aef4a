"""Batches that mix the inlined one-block write with the general path (unaligned, multi-block,
zero, baselines): every point still matches the model, and record times never go backwards even
though the inlined path reads the clock once per batch."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refmodel import Model
from rewind.engine.store import Store

BS = 512
NBLOCKS = 32
SIZE = BS * NBLOCKS


class TickingClock:
    """Moves on by a microsecond at every reading, so a stale reading would show."""

    def __init__(self) -> None:
        self.t = 1_800_000_000 * 10**9

    def __call__(self) -> int:
        self.t += 1000
        return self.t


req = st.one_of(
    st.tuples(st.just("block"), st.integers(0, NBLOCKS - 1), st.just(1), st.integers(0, 255)),
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 3 * BS), st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 4 * BS), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(req, min_size=1, max_size=8), min_size=1, max_size=8), prefill=st.booleans())
def test_mixed_batches(tmp_path: Path, batches: list[list[tuple[str, int, int, int]]], prefill: bool) -> None:
    d = tmp_path / str(len(list(tmp_path.iterdir())))
    d.mkdir()
    img = d / "disk.img"
    m = Model(SIZE)
    if prefill:  # blocks with data get baselines at their first overwrite; a sparse image has none
        img.write_bytes(bytes(range(256)) * (SIZE // 256))
        m.cur[:] = img.read_bytes()
    s = Store.create(img, d / "st", size=None if prefill else SIZE, block_size=BS, clock=TickingClock())
    try:
        m.snap(s.head)
        for batch in batches:
            reqs: list[tuple[str, int, bytes | int]] = []
            for kind, off, n, v in batch:
                if kind == "block":
                    reqs.append(("write", off * BS, bytes([v]) * BS))
                    m.write(off * BS, bytes([v]) * BS)
                elif kind == "write":
                    n = min(n, SIZE - off)
                    reqs.append(("write", off, bytes([v]) * n))
                    m.write(off, bytes([v]) * n)
                else:
                    n = min(n, SIZE - off)
                    reqs.append(("zero", off, n))
                    m.zero(off, n)
            s.live.write_many(reqs)
            m.snap(s.head)
        for seq, ref in m.points.items():
            assert s.at(seq).read(0, SIZE) == ref, f"seq {seq}"
        assert s.live.read(0, SIZE) == bytes(m.cur)
        times = [t for _seq, t in s.points()]
        assert times == sorted(times)
    finally:
        s.close()
