"""A throwaway writable layer over a read-only view of a past point.

A point taken while a filesystem was mounted is crash-consistent: its journal has not been
replayed, so the kernel wants to write while mounting it. An Overlay lets it: reads fall through
to the view until a block is written; writes go to a sparse scratch file tracked by a bitmap and
never reach the store's history. Closing the overlay deletes the scratch file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

from ..errors import BadInput


class ReadableView(Protocol):
    """What an overlay needs from below: a size and positional reads (store.at(...) fits)."""

    @property
    def size(self) -> int: ...

    def read(self, off: int, n: int) -> bytes: ...


class Overlay:
    """Copy-on-write over `view`; scratch data lives in `scratch` (created sparse on first write)."""

    readonly = False

    def __init__(self, view: ReadableView, scratch: str | Path, block_size: int = 4096) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise BadInput(f"overlay block size {block_size} is not a power of two")
        self.view = view
        self.size: int = view.size
        self.scratch = Path(scratch)
        self.block_size = block_size
        nblocks = (self.size + block_size - 1) // block_size
        self._bits = bytearray((nblocks + 7) // 8)
        self._fd: int | None = None
        self._lock = threading.RLock()
        self._dirty = 0

    # --- bitmap -------------------------------------------------------------------------
    def _has(self, b: int) -> bool:
        return bool(self._bits[b >> 3] & (1 << (b & 7)))

    def _set(self, b: int) -> None:
        if not self._has(b):
            self._bits[b >> 3] |= 1 << (b & 7)
            self._dirty += 1

    @property
    def dirty_blocks(self) -> int:
        """How many blocks the overlay holds (written since it was opened)."""
        return self._dirty

    def _scratch_fd(self) -> int:
        if self._fd is None:
            self.scratch.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, self.size)
            self._fd = fd
        return self._fd

    def _check(self, off: int, n: int) -> None:
        if off < 0 or n < 0 or off + n > self.size:
            raise BadInput(f"range {off}+{n} is outside the volume (size {self.size})")

    # --- volume face ---------------------------------------------------------------------
    def read(self, off: int, n: int) -> bytes:
        """Bytes at `off`: written blocks from the scratch file, the rest from the view."""
        self._check(off, n)
        if n == 0:
            return b""
        bs = self.block_size
        with self._lock:
            if self._dirty == 0:
                return self.view.read(off, n)
            out = bytearray()
            pos, end = off, off + n
            while pos < end:
                b = pos // bs
                mine = self._has(b)
                run_end = min(end, (b + 1) * bs)
                while run_end < end and self._has(run_end // bs) == mine:
                    run_end = min(end, run_end + bs)
                if mine:
                    assert self._fd is not None
                    out += os.pread(self._fd, run_end - pos, pos)
                else:
                    out += self.view.read(pos, run_end - pos)
                pos = run_end
            return bytes(out)

    def write(self, off: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Write into the scratch file; partial blocks are first filled from the view."""
        n = len(data)
        self._check(off, n)
        if n == 0:
            return
        bs = self.block_size
        with self._lock:
            fd = self._scratch_fd()
            first, last = off // bs, (off + n - 1) // bs
            # Fill the edges of partially written blocks the overlay does not hold yet.
            for b in {first, last}:
                bstart = b * bs
                partial = off > bstart or off + n < min(bstart + bs, self.size)
                if partial and not self._has(b):
                    blen = min(bs, self.size - bstart)
                    os.pwrite(fd, self.view.read(bstart, blen), bstart)
            os.pwrite(fd, data, off)
            for b in range(first, last + 1):
                self._set(b)

    def zero(self, off: int, n: int, fua: bool = False) -> None:
        """Zeros the range in the overlay (the view is untouched)."""
        step = 1 << 20
        pos = off
        while pos < off + n:
            k = min(step, off + n - pos)
            self.write(pos, bytes(k))
            pos += k

    trim = zero

    def flush(self) -> None:
        """Nothing to make durable: the overlay is thrown away on close."""

    def close(self) -> None:
        """Drop the overlay and delete its scratch file."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.scratch.unlink(missing_ok=True)
            self._bits = bytearray(len(self._bits))
            self._dirty = 0

    def __enter__(self) -> Overlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
