"""The primary volume: a raw image file or a block device, read and written in place."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from .errors import BadInput, NoSpace

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def device_size(fd: int) -> int:
    """Size in bytes of an open file or block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("<Q", buf)[0])
    return int(st.st_size)


class Primary:
    """pread/pwrite on the protected volume, plus zeroing that keeps image files sparse."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = str(path)
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise BadInput(f"primary volume {self.path} is missing: restore it or point the store at it") from None
        except PermissionError:
            raise BadInput(f"no permission to open {self.path}: run as a user who may write it") from None
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise BadInput(f"{self.path} is neither a regular file nor a block device")
        self.size = device_size(self.fd)
        self._can_reserve = not self.is_block

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def pread(self, off: int, n: int) -> bytes:
        data = os.pread(self.fd, n, off)
        if len(data) < n:  # a file that ends early reads as zeros past its end
            data += bytes(n - len(data))
        return data

    def pwrite(self, off: int, data: bytes | bytearray | memoryview) -> None:
        try:
            mv = memoryview(data)
            while len(mv):
                k = os.pwrite(self.fd, mv, off)
                off += k
                mv = mv[k:]
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left on the device holding {self.path}") from e
            raise

    def zero(self, off: int, n: int) -> None:
        """Make [off, off+n) read as zeros: punch a hole in files, BLKZEROOUT on devices."""
        if not self.is_block:
            if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n) == 0:
                return
        else:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", off, n))
                return
            except OSError:
                pass
        chunk = bytes(min(n, 1 << 20))
        while n > 0:
            k = min(n, len(chunk))
            self.pwrite(off, chunk[:k])
            off += k
            n -= k

    def reserve(self, off: int, n: int) -> None:
        """Allocate [off, off+n) of a sparse image now, keeping its contents: the applier writes
        the primary later, and a full disk must refuse the write before it is acknowledged, not
        meet the applier afterwards. A filesystem without fallocate is left as it is."""
        if not self._can_reserve:
            return
        if _fallocate(self.fd, 0, off, n) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left on the device holding {self.path}: free space on its disk")
        self._can_reserve = False  # EOPNOTSUPP and the like

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def holes(self) -> Iterator[tuple[int, int]]:
        """(start, end) byte ranges that are holes in a sparse image (none for devices)."""
        if self.is_block:
            return
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    yield pos, self.size
                    return
                return  # filesystem without SEEK_DATA: assume no holes
            if data > pos:
                yield pos, data
            try:
                pos = os.lseek(self.fd, data, SEEK_HOLE)
            except OSError:
                return
