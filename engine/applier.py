"""Applies journaled writes to the primary in a background thread, lazily.

The foreground appends a batch to the journal and moves on; this thread copies each record's data
from the journal into the primary later, like a database writing its pages after its log: while
writes keep coming (a burst, a benchmark, a VM booting) it waits until LAZY_BYTES are queued, and
otherwise until the writes pause for LAZY_IDLE_S. Meanwhile the live volume reads blocks with an
unapplied write from the journal (view.read_live). Waiting pays twice:
- the writer's client gets the whole machine while the burst lasts;
- a block written again before its turn is written to the primary once (absorption: a queued
  write whose blocks all have a later write is skipped; the later one lands instead).

Lazy application needs the store's last-write array (`last`, per block the seq of its newest
write); without it (a watched primary, a huge volume) every batch is applied at once.

Ordering and durability stay simple: batches are applied in order; a checkpoint waits until
everything it covers is applied (and syncs the journal, for the later writes that absorbed earlier
ones), a fade until what it releases or removes is, close until everything is; recovery redoes
every record past the last checkpoint, so a crash in between loses nothing.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from array import array
from collections import deque

from .errors import NoSpace, RewindError
from .journal.segments import Journal
from .primary import Primary
from .view import LAST_NONE

WRITE = 0
ZERO = 1
# (kind, journal segno, offset in segment, primary offset, length, seq of the record)
Op = tuple[int, int, int, int, int, int]
SMALL = 64 << 10  # up to this, pread + pwrite; bigger ones are copied in the kernel
LAZY_BYTES = 1 << 30  # queued this much, apply down to half of it
LAZY_IDLE_S = 0.05  # or once no batch came for this long
OP_COST = 256  # queue cost of one op beyond its bytes (zero ops carry none): bounds the queue's memory
RETRY_S = 0.5  # a primary write that met a full disk is tried again this often (space may be freed)


class Applier:
    MAX_QUEUED = 2 * LAZY_BYTES  # the foreground waits when this much is not yet applied

    def __init__(self, primary: Primary, journal: Journal, applied_seq: int, block_size: int) -> None:
        self._primary = primary
        self._journal = journal
        self._bs = block_size
        self._q: deque[tuple[int, list[Op], int]] = deque()
        self._cv = threading.Condition()
        self.applied = applied_seq
        self._queued = 0
        self._want = 0  # the highest seq somebody waits for
        self._draining = False
        self._last_submit = 0.0
        self._stop = False
        self.error: BaseException | None = None
        # a full disk under the primary: not fatal, the journal holds the data; the head batch is
        # tried again until it lands, new writes are refused meanwhile (Store), reads go on
        self.full: BaseException | None = None
        self._backlog = 0  # data bytes queued and not yet on the primary
        self.last: array[int] | None = None  # set by the store: lazy application and absorption
        self.skipped = 0  # writes absorbed by a later write to the same blocks
        self._copy = hasattr(os, "copy_file_range")
        self._thread = threading.Thread(target=self._run, name="rewind-applier", daemon=True)
        self._thread.start()

    @property
    def lagging(self) -> bool:
        """Are writes queued that the primary does not hold yet?"""
        return bool(self._q)

    @property
    def backlog(self) -> int:
        """Bytes of journaled writes the primary does not hold yet."""
        return self._backlog

    def check_room(self) -> None:
        """Refuse a new write while the primary's disk is full (NoSpace, saying how far the
        primary lags): the writes before it are safe in the journal and land once there is room."""
        if self.full is not None:
            raise NoSpace(
                f"no space left to write the primary {self._primary.path}: {self._backlog} bytes of"
                f" acknowledged writes wait in the journal for it; free at least that much on its disk"
                f" (writes resume by themselves)"
            )

    def submit(self, seq: int, ops: list[Op], nbytes: int) -> None:
        """Queue one batch's primary writes (in journal order); waits if too much is queued."""
        cost = nbytes + OP_COST * len(ops)
        with self._cv:
            while self._queued > self.MAX_QUEUED and self.error is None:
                self._cv.wait()
            self._raise()
            self._q.append((seq, ops, cost))
            self._queued += cost
            self._backlog += nbytes
            self._last_submit = time.monotonic()
            self._cv.notify_all()

    def wait(self, seq: int) -> None:
        """Return once every batch up to `seq` is on the primary (page cache)."""
        with self._cv:
            if self.applied < seq and self._q:
                self._want = max(self._want, seq)
                self._cv.notify_all()
            while self.applied < seq and self._q and self.error is None and self.full is None:
                self._cv.wait()
            self._raise()
            if self.applied < seq and self._q and self.full is not None:
                self.check_room()

    def check(self) -> None:
        """Raise the error a primary write met, if any (a flush must not hide it)."""
        with self._cv:
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

    def _due(self) -> float | None:
        """0 when the head batch is to be applied now, else how long to wait (None: until told)."""
        if not self._q:
            return None
        if self._stop or self.last is None or self._want > self.applied:
            return 0.0
        if self._queued >= LAZY_BYTES:
            self._draining = True
        elif self._queued < LAZY_BYTES // 2:
            self._draining = False
        if self._draining:
            return 0.0
        idle = time.monotonic() - self._last_submit
        return 0.0 if idle >= LAZY_IDLE_S else LAZY_IDLE_S - idle

    def _run(self) -> None:
        while True:
            with self._cv:
                while (delay := self._due()) != 0.0:
                    if self._stop and not self._q:
                        return
                    self._cv.wait(delay)
                seq, ops, cost = self._q[0]
            try:
                self._apply(ops)
            except (OSError, NoSpace) as e:
                if not isinstance(e, NoSpace) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    with self._cv:  # keep it: every later write, flush and read reports it
                        self.error = e
                        self._cv.notify_all()
                    return
                with self._cv:  # a full disk: try the batch again (writing it twice is harmless)
                    self.full = e
                    self._cv.notify_all()
                    if self._stop:
                        return  # closing: the journal keeps it, the next open's redo writes it
                    self._cv.wait(RETRY_S)
                continue
            except BaseException as e:  # keep it: every later write, flush and read reports it
                with self._cv:
                    self.error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._q.popleft()
                self._queued -= cost
                self._backlog -= sum(op[4] for op in ops if op[0] == WRITE)
                self.applied = seq
                self.full = None
                self._cv.notify_all()

    def _apply(self, ops: list[Op]) -> None:
        last, bs = self.last, self._bs
        pfd, pread, pwrite = self._primary.fd, os.pread, os.pwrite
        jfd = self._journal._fd
        for op in ops:
            kind, segno, joff, poff, n, seq = op
            if kind == WRITE and last is not None and poff % bs == 0 and n % bs == 0:
                b0 = poff // bs
                if n == bs:
                    newer = last[b0]
                    absorbed = seq < newer < LAST_NONE
                else:
                    run = last[b0 : b0 + n // bs]
                    absorbed = seq < min(run) and max(run) < LAST_NONE
                if absorbed:  # every block has a later write, queued behind this one
                    self.skipped += 1
                    continue
            if kind == WRITE and n <= SMALL:
                data = pread(jfd(segno), n, joff)
                if len(data) == n and pwrite(pfd, data, poff) == n:
                    continue
            self._do(op)

    def _do(self, op: Op) -> None:
        kind, segno, joff, poff, n, _seq = op
        if kind == ZERO:
            self._primary.zero(poff, n)
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
