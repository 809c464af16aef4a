"""export: write a new sparse image equal to the volume at a point (claim 5: the maps merged)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInput, NoSpace
from . import Job, Progress

if TYPE_CHECKING:
    from ..store import Store

CHUNK = 4 << 20


def export_job(store: Store, seq: int, out: str | Path) -> Job:
    """Checks OUT now (bad input fails before any work); the job writes OUT.partial, then renames.

    Cancelled, failed or killed, it leaves no OUT behind (only a hidden partial file if killed).
    """
    dest = Path(out).absolute()
    if dest.is_dir():
        raise BadInput(f"{dest} is a directory: give a file name for the exported image")
    if not dest.parent.is_dir():
        raise BadInput(f"{dest.parent} does not exist: create it first")
    if str(dest) == store.primary_path or store.dir in dest.parents:
        raise BadInput("export into the primary or the store itself is not allowed: pick another file")
    size = store.size

    def body(check: Callable[[], None]) -> Generator[Progress, None, Any]:
        tmp = dest.with_name(f".{dest.name}.rewind-partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        ok = False
        try:
            os.ftruncate(fd, size)
            zeros = bytes(CHUNK)
            for off in range(0, size, CHUNK):
                check()
                n = min(CHUNK, size - off)
                data = store._read(seq, off, n)
                if data != zeros[:n]:  # keep the image sparse
                    _pwrite_all(fd, data, off, dest)
                yield Progress("export", off + n, size)
            os.fsync(fd)
            os.rename(tmp, dest)
            ok = True
        finally:
            os.close(fd)
            if not ok:
                tmp.unlink(missing_ok=True)
        return str(dest)

    return Job("export", body)


def _pwrite_all(fd: int, data: bytes, off: int, dest: Path) -> None:
    """All of it or an error: a short write (a full disk) must never leave a wrong image."""
    mv = memoryview(data)
    try:
        while len(mv):
            k = os.pwrite(fd, mv, off)
            if k <= 0:
                raise OSError(errno.ENOSPC, "short write")
            mv = mv[k:]
            off += k
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left on the disk holding {dest}: free some space or export elsewhere") from e
        raise
