"""Shared fixtures: a controllable clock and small stores, plus a plain reference model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rewind.engine.store import Store

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


class Clock:
    """A clock tests move by hand (ns)."""

    def __init__(self, start: int = 1_800_000_000 * 10**9) -> None:
        self.t = start

    def __call__(self) -> int:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += int(seconds * 1e9)


class Model:
    """The reference: a bytearray per point in time (seq -> contents)."""

    def __init__(self, size: int) -> None:
        self.cur = bytearray(size)
        self.points: dict[int, bytes] = {}

    def write(self, off: int, data: bytes) -> None:
        self.cur[off : off + len(data)] = data

    def zero(self, off: int, n: int) -> None:
        self.cur[off : off + n] = bytes(n)

    def snap(self, seq: int) -> None:
        self.points[seq] = bytes(self.cur)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s = Store.create(tmp_path / "disk.img", tmp_path / "store", size=1 << 20, block_size=4096, clock=clock)
    yield s
    s.close()
