"""Files Rewind creates: private (0600 files, 0700 directories) and never through a planted name.

A fixed temporary name beside a user-chosen target (".OUT.partial") lets another user who can
write that directory (a sticky /tmp) plant a symlink there first, and a root export would then
write through it into any file. So temporary files get a random name and are created with
O_EXCL|O_NOFOLLOW: a name that exists, as a file or a link, is never opened.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_beside(dest: str | Path, mode: int = FILE_MODE) -> tuple[int, Path]:
    """A new empty file (fd, path) with a random hidden name in `dest`'s directory, for writing
    and then renaming onto `dest` (same directory: the rename is atomic)."""
    dest = Path(dest)
    stem = dest.name[:200]  # room for the suffix within NAME_MAX
    for _ in range(100):
        tmp = dest.with_name(f".{stem}.{secrets.token_hex(8)}.rewind-partial")
        try:
            return os.open(tmp, _NEW, mode), tmp
        except FileExistsError:  # someone else's name (planted or by chance): draw another
            continue
    raise FileExistsError(f"cannot find a free temporary name beside {dest}")


def create_new(path: str | Path, mode: int = FILE_MODE) -> int:
    """Create `path`, which must not exist (not even as a dangling link); returns a write fd."""
    return os.open(path, _NEW, mode)


def open_private(path: str | Path) -> int:
    """Create or truncate `path` in a directory Rewind owns (the store), mode 0600 even if a stale
    file had another; a link at that name is refused (ELOOP), not followed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # O_TRUNC keeps a stale file's mode
    return fd


def write_replace(dest: str | Path, data: bytes) -> None:
    """Write `data` to a private new file beside `dest`, fsync it, then rename it onto `dest`."""
    fd, tmp = create_beside(dest)
    ok = False
    try:
        mv = memoryview(data)
        while len(mv):
            mv = mv[os.write(fd, mv):]
        os.fsync(fd)
        os.rename(tmp, dest)
        ok = True
    finally:
        os.close(fd)
        if not ok:
            tmp.unlink(missing_ok=True)


def tighten(d: str | Path, subdirs: tuple[str, ...] = ("journal",)) -> list[str]:
    """Take group/other permissions off directory `d`, the listed subdirectories and the files
    directly in them (not following links). Returns what it changed or could not change, as
    short lines for the user; empty when everything was private already."""
    d = Path(d)
    changed: list[str] = []
    failed: list[str] = []
    dirs = [d] + [d / s for s in subdirs]
    paths: list[Path] = list(dirs)
    for sub in dirs:
        try:
            paths += [sub / n for n in sorted(os.listdir(sub))]
        except OSError:
            continue
    for p in dict.fromkeys(paths):
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            continue
        try:
            os.chmod(p, stat.S_IMODE(st.st_mode) & 0o700)  # not a link: checked just above
            changed.append(p.name + "/" if stat.S_ISDIR(st.st_mode) else p.name)
        except OSError:
            failed.append(str(p))
    notes = []
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        notes.append(f"{d} was readable by other users: made it private (0700/0600): {shown}")
    if failed:
        notes.append(f"warning: could not make {', '.join(failed[:3])} private (chmod failed): "
                     "check their owner and permissions; other users may read your history")
    return notes
