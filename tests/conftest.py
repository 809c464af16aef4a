"""Shared fixtures: a controllable clock and a small store (references live in refmodel.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from refmodel import Clock
from rewind.engine.store import Store

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s = Store.create(tmp_path / "disk.img", tmp_path / "store", size=1 << 20, block_size=4096, clock=clock)
    yield s
    s.close()
