"""export: write a new sparse image equal to the volume at a point (claim 5: the maps merged)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInput, NoSpace
from ..safefile import create_beside
from . import Job, Progress

if TYPE_CHECKING:
    from ..store import Store

CHUNK = 4 << 20


def export_job(store: Store, seq: int, out: str | Path) -> Job:
    """Checks OUT now (bad input fails before any work); the job writes a hidden file with a random
    name beside OUT (created O_EXCL|O_NOFOLLOW, mode 0600: see safefile), then renames it onto OUT.

    Cancelled, failed or killed, it leaves no OUT behind (only a hidden partial file if killed).
    The image is private (0600) whatever the primary's mode: it holds the volume's data.
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
        fd, tmp = create_beside(dest)
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
