"""A full disk on purpose (borg style): the journal fills up, writes fail with NoSpace, nothing
journaled is lost, the store stays consistent, and it works again once there is room."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import tiny_tmpfs
from refmodel import Model
from rewind.engine.errors import NoSpace
from rewind.engine.store import Store

BS = 4096


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    with tiny_tmpfs(tmp_path / "tiny", "2m") as mnt:
        yield mnt


def test_journal_fills_the_disk(tmp_path: Path, tiny_fs: Path) -> None:
    size = 1024 * BS
    s = Store.create(tmp_path / "disk.img", tiny_fs / "st", size=size)
    m = Model(size)
    m.snap(s.head)
    written = 0
    with pytest.raises(NoSpace):
        for i in range(2000):
            data = bytes([i % 250 + 1]) * (4 * BS)
            off = (i * 4 * BS) % size
            s.live.write_many([("write", off, data)])
            m.write(off, data)
            m.snap(s.head)
            written += 1
    assert written > 50
    # the failed write changed nothing: not the primary, not the history
    assert s.live.read(0, size) == bytes(m.cur)
    for seq in list(m.points)[:: max(1, len(m.points) // 20)]:
        assert s.at(seq).read(0, size) == m.points[seq]
    s.close()
    # make room (the SQLite index may not even have fitted), reopen: all still there
    big = tiny_fs / "st" / "journal"
    segs = sorted(big.glob("seg-*"))
    assert segs
    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_fs)], check=True)
    s = Store.open(tiny_fs / "st")
    try:
        assert s.live.read(0, size) == bytes(m.cur)
        for seq in list(m.points)[:: max(1, len(m.points) // 20)]:
            assert s.at(seq).read(0, size) == m.points[seq]
        s.live.write(0, b"\x77" * BS)
        assert s.live.read(0, BS) == b"\x77" * BS
        assert s.verify().run() == []
    finally:
        s.close()
