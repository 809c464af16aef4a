"""The primary is synced only at checkpoints, so a power loss may lose primary writes whose records
are already indexed: the next open redoes them from the last checkpoint on. Simulated here by a
process that exits without closing the store, and a primary whose unsynced writes are gone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rewind.engine import store as store_mod
from rewind.engine.store import Store

BS = 4096
NBLOCKS = 256


def test_indexed_writes_lost_from_the_primary_are_redone(tmp_path: Path) -> None:
    img, st = tmp_path / "disk.img", tmp_path / "st"
    Store.create(img, st, size=NBLOCKS * BS).close()  # a checkpoint at the empty volume
    script = textwrap.dedent(
        f"""
        import os
        from rewind.engine.store import Store
        s = Store.open({str(st)!r})
        for i in range(40):
            s.live.write_many([("write", ((i * 37) % {NBLOCKS}) * {BS}, bytes([i + 1]) * {BS})])
            if i == 19:
                s.mark("half")
        s.live.write_many([("zero", 5 * {BS}, 3 * {BS})])
        s.live.flush()
        s._index_sync()  # indexed, but no checkpoint: the primary was never synced
        assert s._wdb.get_meta("indexed_seq") == s.head
        os._exit(0)  # no close
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)

    model = bytearray(NBLOCKS * BS)
    half = b""
    for i in range(40):
        b = (i * 37) % NBLOCKS
        model[b * BS : (b + 1) * BS] = bytes([i + 1]) * BS
        if i == 19:
            half = bytes(model)
    model[5 * BS : 8 * BS] = bytes(3 * BS)
    # power loss: none of the primary's writes reached the disk
    img.write_bytes(bytes(NBLOCKS * BS))

    s = Store.open(st)
    try:
        assert any("re-applied" in r for r in s.recovery), s.recovery
        assert s.live.read(0, NBLOCKS * BS) == bytes(model)
        assert s.at("mark:half").read(0, NBLOCKS * BS) == half
    finally:
        s.close()
    assert img.read_bytes() == bytes(model)
    # closed cleanly: a checkpoint, so the next open has nothing to redo
    s = Store.open(st)
    try:
        assert not any("re-applied" in r for r in s.recovery), s.recovery
        assert s.live.read(0, NBLOCKS * BS) == bytes(model)
    finally:
        s.close()


def test_a_fade_checkpoints_first(tmp_path: Path) -> None:
    """A fade may rewrite or delete old segments: it makes the primary durable before, so a
    redo never has to read them."""
    img, st = tmp_path / "disk.img", tmp_path / "st"
    s = Store.create(img, st, size=NBLOCKS * BS)
    try:
        s.live.write_many([("write", 0, b"\x01" * BS)])
        s._index_sync()
        before = (s._wdb.get_meta("redo_segno"), s._wdb.get_meta("redo_off"))
        s.fade().run()
        after = (int(s._wdb.get_meta("redo_segno")), int(s._wdb.get_meta("redo_off")))
        assert after == s._indexed_pos and after != before
    finally:
        s.close()


def test_checkpoints_run_beside_the_indexer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CHECKPOINT_BYTES of journal, a checkpoint thread drains the applier, syncs the primary
    and moves the redo start on by itself; the indexer goes on committing meanwhile."""
    monkeypatch.setattr(store_mod, "CHECKPOINT_BYTES", 64 * BS)
    img, st = tmp_path / "disk.img", tmp_path / "st"
    s = Store.create(img, st, size=NBLOCKS * BS)
    try:
        start = (s._wdb.get_meta("redo_segno"), s._wdb.get_meta("redo_off"))
        for i in range(200):
            s.live.write_many([("write", (i % NBLOCKS) * BS, bytes([i % 250 + 1]) * BS)])
        s._index_sync()
        deadline = time.monotonic() + 10
        while (s._wdb.get_meta("redo_segno"), s._wdb.get_meta("redo_off")) == start:
            assert time.monotonic() < deadline, "no checkpoint ran"
            time.sleep(0.02)
        redo = (int(s._wdb.get_meta("redo_segno")), int(s._wdb.get_meta("redo_off")))
        assert redo <= s._indexed_pos
    finally:
        s.close()
