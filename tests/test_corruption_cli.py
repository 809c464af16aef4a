"""Corruption through the command line: a flipped byte in a journal segment makes `rewind verify`
exit 1 naming the file and offset, and `rewind export` of a point that needs the damaged block exit 1
(one line, no output file), both directly and through a running serve. Points that do not need the
damaged block still export."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REWIND = [sys.executable, "-m", "rewind.engine"]
MARKER = b"CORRUPT-ME-PLEASE" * 241  # 4097 bytes: sliced to one block below


def run(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REWIND, *argv], cwd=cwd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, Path, int]:
    """A store whose mark `m1` needs a journaled block, with one byte of that block flipped."""
    from rewind.engine.store import Store

    r = run(tmp_path, "protect", "disk.img", "--store", "s", "--size", "1M")
    assert r.returncode == 0, r.stderr
    with Store.open(tmp_path / "s") as st:
        st.live.write(8192, MARKER[:4096])
        st.live.flush()
        st.mark("m1")
        st.live.write(8192, b"B" * 4096)  # now m1's block 2 lives only in the journal
        st.live.flush()
        st.mark("m2")
    segs = sorted((tmp_path / "s" / "journal").glob("seg-*"))
    hits = [(seg, seg.read_bytes().find(MARKER[:4096])) for seg in segs]
    seg, pos = next((s, p) for s, p in hits if p >= 0)
    off = pos + 1000
    with open(seg, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))
    return tmp_path, seg, off


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock" and not p.is_socket()}


def check_verify(r: subprocess.CompletedProcess[str], seg: Path) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert seg.name in r.stdout, r.stdout
    assert re.search(r"offset \d+", r.stdout), r.stdout
    assert len(r.stderr.splitlines()) == 1 and "problem" in r.stderr


def check_export_fails(cwd: Path, seg: Path, point: str) -> None:
    before = tree_hash(cwd / "s")
    r = run(cwd, "export", "s", "--at", point, "bad.img")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert seg.name in r.stderr, r.stderr
    assert not (cwd / "bad.img").exists()
    assert not list(cwd.glob(".bad.img*")), "a partial export was left behind"
    assert tree_hash(cwd / "s") == before


def test_verify_and_export_report_corruption(damaged: tuple[Path, Path, int]) -> None:
    cwd, seg, off = damaged
    r = run(cwd, "verify", "s")
    check_verify(r, seg)
    # The reported location is the damaged block (its start or the flipped byte).
    offsets = [int(x) for x in re.findall(r"offset (\d+)", r.stdout)]
    assert any(o <= off < o + 4096 + 64 for o in offsets), (off, r.stdout)
    check_export_fails(cwd, seg, "mark:m1")
    ok = run(cwd, "export", "s", "--at", "mark:m2", "good.img")
    assert ok.returncode == 0, ok.stderr
    data = (cwd / "good.img").read_bytes()
    assert data[8192:12288] == b"B" * 4096


def test_corruption_through_serve(damaged: tuple[Path, Path, int]) -> None:
    cwd, seg, _off = damaged
    p = subprocess.Popen([*REWIND, "serve", "s"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().startswith("ready")
        check_verify(run(cwd, "verify", "s"), seg)
        check_export_fails(cwd, seg, "mark:m1")
        ok = run(cwd, "export", "s", "--at", "mark:m2", "good.img")
        assert ok.returncode == 0, ok.stderr
        assert p.poll() is None, "serve died on a corruption error"
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
