"""Applies journaled writes to the primary in a background thread.

The foreground appends a batch to the journal and moves on; this thread copies each record's data
from the journal into the primary with copy_file_range (page cache to page cache, in the kernel,
without the GIL), so a protected write costs the client one write, not two. Ordering and
durability stay simple: batches are applied in order; FLUSH, reads of the live volume and the
index commit all wait until the batches they depend on are applied; recovery redoes any record
that is journaled but not yet indexed, so a crash in between loses nothing.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque

from .errors import NoSpace, RewindError
from .journal.segments import Journal
from .primary import Primary

WRITE = 0
ZERO = 1
# (kind, journal segno, offset in segment, primary offset, length, data or None)
# Small writes carry a copy of their data (a 4 KiB pwrite costs a third of a copy_file_range);
# big ones are copied from the journal in the kernel.
Op = tuple[int, int, int, int, int, bytes | None]
SMALL = 64 << 10


class Applier:
    MAX_QUEUED = 256 << 20  # the foreground waits when this much is not yet applied

    def __init__(self, primary: Primary, journal: Journal, applied_seq: int) -> None:
        self._primary = primary
        self._journal = journal
        self._q: deque[tuple[int, list[Op], int]] = deque()
        self._cv = threading.Condition()
        self.applied = applied_seq
        self._queued = 0
        self._stop = False
        self.error: BaseException | None = None
        self._copy = hasattr(os, "copy_file_range")
        self._thread = threading.Thread(target=self._run, name="rewind-applier", daemon=True)
        self._thread.start()

    def submit(self, seq: int, ops: list[Op], nbytes: int) -> None:
        """Queue one batch's primary writes (in journal order); waits if too much is queued."""
        with self._cv:
            while self._queued > self.MAX_QUEUED and self.error is None:
                self._cv.wait()
            self._raise()
            self._q.append((seq, ops, nbytes))
            self._queued += nbytes
            self._cv.notify_all()

    def wait(self, seq: int) -> None:
        """Return once every batch up to `seq` is on the primary (page cache)."""
        with self._cv:
            while self.applied < seq and self._q and self.error is None:
                self._cv.wait()
            self._raise()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        e = self.error
        if e is None:
            return
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left to write the primary {self._primary.path}: free space on its disk")
        if isinstance(e, RewindError):
            raise e
        raise RewindError(f"writing the primary {self._primary.path} failed ({e}); the journal keeps the data")

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._stop:
                    self._cv.wait()
                if not self._q:
                    return
                seq, ops, nbytes = self._q[0]
            try:
                fd, pwrite = self._primary.fd, os.pwrite
                for op in ops:
                    data = op[5]
                    # the common small write inline: every bytecode here holds the GIL the
                    # writer thread wants back after each of its syscalls
                    if data is None or pwrite(fd, data, op[3]) != len(data):
                        self._do(op)
            except BaseException as e:  # keep it: every later write, flush and read reports it
                with self._cv:
                    self.error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._q.popleft()
                self._queued -= nbytes
                self.applied = seq
                self._cv.notify_all()

    def _do(self, op: Op) -> None:
        kind, segno, joff, poff, n, data = op
        if kind == ZERO:
            self._primary.zero(poff, n)
            return
        if data is not None:
            self._primary.pwrite(poff, data)
            return
        src = self._journal._fd(segno)
        dst = self._primary.fd
        while n > 0 and self._copy:
            try:
                k = os.copy_file_range(src, dst, n, joff, poff)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                    raise
                self._copy = False  # e.g. a block device: copy through user space instead
                break
            if k <= 0:
                break
            n -= k
            joff += k
            poff += k
        while n > 0:
            data = os.pread(src, min(n, 8 << 20), joff)
            if not data:
                raise OSError(errno.EIO, "journal shorter than a queued write")
            self._primary.pwrite(poff, data)
            n -= len(data)
            joff += len(data)
            poff += len(data)
