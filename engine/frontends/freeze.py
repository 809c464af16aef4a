"""Freeze a mounted filesystem around a mark so that the point is clean, not crash-consistent.

`fsfreeze -f` flushes the filesystem (its journal included) down to the block device, which on
our volumes means through the loop device and the FUSE view into the store, and blocks new writes
until `fsfreeze -u`. A mark taken while frozen mounts read-only without journal replay.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from ..errors import BadInput, RewindError

T = TypeVar("T")


class FreezeError(RewindError):
    """fsfreeze failed (not root, not a mount point, filesystem without freeze support)."""


def _fsfreeze(flag: str, mountpoint: str) -> None:
    tool = shutil.which("fsfreeze") or next(
        (p for p in ("/usr/sbin/fsfreeze", "/sbin/fsfreeze") if os.path.exists(p)), None)
    if tool is None:
        raise FreezeError("fsfreeze is missing: install util-linux, or mark without --freeze")
    p = subprocess.run([tool, flag, mountpoint], capture_output=True, text=True)
    if p.returncode != 0:
        what = "freeze" if flag == "-f" else "unfreeze"
        msg = (p.stderr or p.stdout).strip() or f"exit {p.returncode}"
        raise FreezeError(f"cannot {what} {mountpoint}: {msg} (needs root and a mounted filesystem)")


@contextmanager
def frozen(mountpoint: str | Path) -> Iterator[Path]:
    """Freeze the filesystem mounted at `mountpoint` for the body; always unfreezes."""
    mp = Path(mountpoint)
    if not mp.is_dir():
        raise BadInput(f"{mp} is not a directory: give the mount point of the filesystem to freeze")
    if not os.path.ismount(mp):
        raise BadInput(f"{mp} is not a mount point: give where the filesystem is mounted")
    _fsfreeze("-f", str(mp))
    try:
        yield mp
    finally:
        _fsfreeze("-u", str(mp))


def with_frozen(mountpoint: str | Path, fn: Callable[[], T]) -> T:
    """Run `fn` (e.g. `lambda: store.mark(name)`) while the filesystem is frozen."""
    with frozen(mountpoint):
        return fn()


__all__ = ["frozen", "with_frozen", "FreezeError"]
