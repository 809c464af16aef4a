"""Crashes and damage at the engine level: torn tails are cut, corruption is reported, never served."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rewind.engine.errors import CorruptionError
from rewind.engine.journal.segments import split_loc
from rewind.engine.store import Store

CHILD = textwrap.dedent(
    """
    import os, sys, signal
    from rewind.engine.store import Store
    s = Store.open(sys.argv[1])
    for i in range(int(sys.argv[2])):
        s.live.write((i % 200) * 4096, bytes([i % 251 + 1]) * 4096)
        if i % 10 == 9:
            s.live.flush()
            print(i, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_and_kill(store_dir: Path, n: int) -> int:
    r = subprocess.run([sys.executable, "-c", CHILD, str(store_dir), str(n)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    return int(r.stdout.split()[-1])


def expected_block(i_last: int, blk: int) -> bytes:
    """Contents of block `blk` after writes 0..i_last of the child's pattern."""
    last = None
    for i in range(i_last + 1):
        if i % 200 == blk:
            last = i
    return bytes(4096) if last is None else bytes([last % 251 + 1]) * 4096


def test_kill9_keeps_flushed_writes_and_cuts_torn_tail(tmp_path: Path) -> None:
    Store.create(tmp_path / "d.img", tmp_path / "st", size=256 * 4096).close()
    flushed = run_and_kill(tmp_path / "st", 455)
    # tear the last record in half, as a crash in the middle of an append would
    seg = sorted((tmp_path / "st" / "journal").glob("seg-*"))[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - 1000)
    s = Store.open(tmp_path / "st")
    try:
        assert any("torn" in r for r in s.recovery), s.recovery
        # every flushed write is there, at its own point and in the live volume
        live = s.live.read(0, 200 * 4096)
        head_writes = s.head  # one record per write (a sparse primary needs no baselines)
        assert flushed + 1 <= head_writes < 455  # all flushed writes kept, the torn one cut
        for blk in range(200):
            assert live[blk * 4096 : (blk + 1) * 4096] == expected_block(head_writes - 1, blk)
        # each point seq:k (k-th write) reads as the model after writes 0..k-1
        for k in range(1, head_writes + 1, 37):
            view = s.at(k).read(0, 200 * 4096)
            for blk in (0, 5, 77, 199):
                assert view[blk * 4096 : (blk + 1) * 4096] == expected_block(k - 1, blk)
        assert s.verify().run() == []
    finally:
        s.close()


def test_flipped_byte_is_reported_and_not_served(tmp_path: Path) -> None:
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=64 * 4096)
    s.live.write(0, b"A" * 4096)
    s.mark("a")
    s.live.write(0, b"B" * 4096)
    seq_a = s.resolve("mark:a")
    v = s._version(0, seq_a)
    assert v is not None
    segno, off = split_loc(v[1])
    s.close()
    seg = tmp_path / "st" / "journal" / f"seg-{segno:08d}.rwj"
    with open(seg, "r+b") as f:
        f.seek(off + 100)
        b = f.read(1)
        f.seek(off + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    s = Store.open(tmp_path / "st")
    try:
        problems = s.verify().run()
        assert problems and seg.name in problems[0] and "offset" in problems[0]
        with pytest.raises(CorruptionError) as e:
            s.at("mark:a").read(0, 4096)
        assert seg.name in str(e.value)
        assert s.live.read(0, 4096) == b"B" * 4096  # the present is unaffected
        with pytest.raises(CorruptionError):
            s.export("mark:a", tmp_path / "x.img").run()
        assert not (tmp_path / "x.img").exists()
    finally:
        s.close()


def test_second_open_is_refused_while_locked(tmp_path: Path) -> None:
    from rewind.engine.errors import StoreLocked

    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=64 * 4096)
    try:
        r = subprocess.run(
            [sys.executable, "-c", f"from rewind.engine.store import Store; Store.open({str(tmp_path / 'st')!r})"],
            capture_output=True,
            text=True,
        )
        assert "StoreLocked" in r.stderr and str(os.getpid()) in r.stderr
        assert StoreLocked.exit_code == 1
    finally:
        s.close()
