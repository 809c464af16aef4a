"""A full disk on purpose (borg style): the journal fills up, writes fail with NoSpace, nothing
journaled is lost, the store stays consistent, and it works again once there is room."""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import tiny_tmpfs
from refmodel import Model
from rewind.engine import store as store_mod
from rewind.engine.cli import format_log
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


def _fill(path: Path, n: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(n))


def _write_until_full(s: Store, m: Model, off: int, step: int, rnd: random.Random) -> tuple[int, str]:
    """Write `step`-byte chunks from `off` on until the disk refuses 20 in a row; the model takes
    only the acknowledged ones. Returns where it got to and the last refusal's message."""
    fails, msg = 0, ""
    while fails < 20 and off + step <= s.size:
        data = rnd.randbytes(step)
        try:
            s.live.write(off, data)
        except NoSpace as e:
            fails, msg = fails + 1, str(e)
            continue
        m.write(off, data)
        off += step
        fails = 0
    return off, msg


@pytest.mark.parametrize("lazy", [True, False])
def test_primary_and_store_on_one_full_disk(tmp_path: Path, lazy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 #10: the primary (sparse) and the store share a small filesystem. Writes are
    refused cleanly once it is full, never acknowledged and then stuck; log, verify, past reads
    and an export to another disk work meanwhile; how far the primary lags is reported; once
    space is freed, writes succeed again without a restart, and every acknowledged write is there."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    if not lazy:  # a volume too big for the last-write array: the applier keeps up at once
        monkeypatch.setattr(store_mod, "LAST_MAX_BLOCKS", 0)
    size = 32 << 20
    rnd = random.Random(13)
    with tiny_tmpfs(tmp_path / "tiny", "40m") as fs:
        _fill(fs / "ballast", 8 << 20)
        _fill(fs / "ballast2", 1 << 20)
        s = Store.create(fs / "disk.img", fs / "st", size=size)
        try:
            m = Model(size)
            s.live.write(0, b"\x01" * (3 << 20))
            s.live.zero(0, 3 << 20)  # punched out of the primary again: rewriting it needs room later
            s.flush(primary=True)
            m.snap(s.head)
            past = s.head
            s.live.write(3 << 20, b"\x02" * BS)
            m.write(3 << 20, b"\x02" * BS)
            # 1. fill the disk: writes into the sparse primary's holes are refused once it is full
            end, msg = _write_until_full(s, m, 4 << 20, 256 << 10, rnd)
            assert end > 8 << 20 and "no space" in msg, (end, msg)
            assert s.live.read(0, size) == bytes(m.cur)

            # 2. a little room, taken by the journal: the primary cannot take the same write later
            (fs / "ballast2").unlink()
            st = os.statvfs(fs)
            room = st.f_bavail * st.f_frsize
            n = room * 3 // 4 // BS * BS  # fits in the journal, not twice (journal and primary)
            assert (512 << 10) <= n <= (3 << 20)
            data = rnd.randbytes(n)
            s.live.write(0, data)  # into the punched-out range: journaled, acknowledged
            m.write(0, data)
            s.flush()
            deadline = time.monotonic() + 10
            while not s.info()["primary_full"] and time.monotonic() < deadline:
                time.sleep(0.05)  # the applier meets the full disk (and `rewind log` says so)
            assert s.info()["primary_full"]
            with pytest.raises(NoSpace, match=r"\d+ bytes of acknowledged writes wait"):
                s.live.write(8 * BS, b"\x03" * BS)  # refused before it is acknowledged

            # 3. read-only work goes on: live and past reads, log, verify, export elsewhere
            assert s.live.read(0, size) == bytes(m.cur)  # unapplied blocks come from the journal
            assert s.at(past).read(0, size) == m.points[past]
            info = s.info()
            assert info["primary_backlog_bytes"] >= n and info["primary_full"]
            log = format_log(info)  # `rewind log` says it too
            assert any(ln.startswith("primary lags:") for ln in log) and any("full" in ln for ln in log)
            assert s.verify().run() == []
            out = tmp_path / "export.img"
            s.export("now", out).run()
            assert out.read_bytes() == bytes(m.cur)
            s.export(past, tmp_path / "past.img").run()
            assert (tmp_path / "past.img").read_bytes() == m.points[past]

            # 4. free space: the backlog lands and writes succeed again, no restart
            (fs / "ballast").unlink()
            deadline = time.monotonic() + 10
            while s.info()["primary_full"] and time.monotonic() < deadline:
                time.sleep(0.05)
            info = s.info()
            assert not info["primary_full"] and info["primary_backlog_bytes"] < n
            for i in range(8):
                data = rnd.randbytes(256 << 10)
                s.live.write(end + i * (256 << 10), data)
                m.write(end + i * (256 << 10), data)
            s.flush(primary=True)
            assert s.live.read(0, size) == bytes(m.cur)
            assert (fs / "disk.img").read_bytes() == bytes(m.cur)
        finally:
            s.close()
        s = Store.open(fs / "st")
        try:
            assert s.live.read(0, size) == bytes(m.cur)
            assert s.at(past).read(0, size) == m.points[past]
            assert s.verify().run() == []
        finally:
            s.close()
