"""Pieces several test files need: a real full disk, and a `rewind serve` in a subprocess."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tiny_tmpfs(mnt: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `mnt`: a real full disk (mounting needs root, else skipped)."""
    mnt.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@contextlib.contextmanager
def rewind_serve(store_dir: Path, sock: Path) -> Iterator[subprocess.Popen[str]]:
    """`rewind serve STORE --nbd unix:SOCK`, ready when entered, stopped (TERM, then KILL) on exit."""
    rewind = Path(sys.executable).with_name("rewind")
    cmd = [str(rewind)] if rewind.exists() else [sys.executable, "-m", "rewind.engine"]
    proc = subprocess.Popen([*cmd, "serve", str(store_dir), "--nbd", f"unix:{sock}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("ready"):
            pytest.fail(f"rewind serve did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
