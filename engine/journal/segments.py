"""Segment files: where records live, how a batch is appended in one syscall, and the recovery scan.

A location ("loc") is one integer: segment number << 36 | byte offset in that segment, so the
index stores a single column per version.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptionError, NoSpace
from .record import (
    HEADER_SIZE,
    SEGMENT_HEADER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    Header,
    HeaderError,
    Kind,
    crc32c,
    decode_header,
    header_crc_ok,
    unpack_table,
)

LOC_SHIFT = 36
LOC_MASK = (1 << LOC_SHIFT) - 1
ZERO_LOC = -1  # the first zero location; any negative loc means "reads as zeros"
IOV_MAX = 1024


def make_loc(segno: int, off: int) -> int:
    return (segno << LOC_SHIFT) | off


def split_loc(loc: int) -> tuple[int, int]:
    return loc >> LOC_SHIFT, loc & LOC_MASK


def zero_loc(segno: int, header_off: int) -> int:
    """Where a ZERO record lies, as a negative loc: the block reads as zeros, and retention still
    knows which segment holds the record, so it is kept (and survives a rebuild) while needed."""
    return -1 - make_loc(segno, header_off)


def record_of_zero(loc: int) -> tuple[int, int]:
    """(segno, header offset) of the ZERO record behind a negative loc."""
    return split_loc(-1 - loc)


def segment_name(segno: int) -> str:
    return f"seg-{segno:08d}.rwj"


@dataclass
class Scanned:
    """One record found by a scan. `crcs` holds the per-block table for WRITE/BASELINE."""

    hdr: Header
    segno: int
    offset: int  # of the header within the segment
    crcs: tuple[int, ...]
    name: str = ""
    bad: tuple[int, ...] = ()  # blocks whose data failed its checksum (scan with strict=False)

    @property
    def data_off(self) -> int:
        """Offset of the first data block within the segment."""
        return self.offset + HEADER_SIZE + 4 * len(self.crcs)

    @property
    def end(self) -> int:
        return self.offset + self.hdr.total


class TornTail(Exception):
    """The scan stopped at a record that was never completely written."""

    def __init__(self, segno: int, offset: int, reason: str) -> None:
        super().__init__(f"{segment_name(segno)} offset {offset}: {reason}")
        self.segno = segno
        self.offset = offset
        self.reason = reason


def _open_segment(path: Path, flags: int = 0) -> int:
    """Open a segment read-write without atime updates: past reads would otherwise dirty each
    segment's inode once, and the filesystem journal commits that follow (with a cache flush)
    stall other reads. O_NOATIME needs the file's owner; anyone else opens it plainly."""
    flags |= os.O_RDWR | os.O_CLOEXEC
    try:
        return os.open(path, flags | getattr(os, "O_NOATIME", 0), 0o600)
    except PermissionError:
        return os.open(path, flags, 0o600)


class Journal:
    """Append-only segments under DIR/journal. Not thread-safe: the Store serialises access."""

    SEGMENT_LIMIT = 256 << 20

    def __init__(self, path: Path, block_size: int, first_segno: int = 1) -> None:
        """`first_segno`: the number a journal with no segment left starts at (past every segment
        the index knows, so no number is used twice)."""
        self.path = path
        self.block_size = block_size
        # smaller segments the store asks for under a small space limit: a fade frees whole
        # segments, so a 256 MiB one under a 64 MiB limit could never be freed in time
        self.cap: int | None = None
        path.mkdir(parents=True, exist_ok=True)
        self._fds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._dir_dirty = False  # a segment was created since the last sync
        segs = self.segment_numbers()
        self.segno = segs[-1] if segs else 0
        self.end = 0
        if segs:
            self.end = os.path.getsize(self.seg_path(self.segno))
        else:
            self._new_segment(max(1, first_segno))
            self._sync_dir()
        self.total_bytes = self.size_bytes()

    # files -------------------------------------------------------------------------------
    def seg_path(self, segno: int) -> Path:
        return self.path / segment_name(segno)

    def segment_numbers(self) -> list[int]:
        out = []
        for p in self.path.glob("seg-*.rwj"):
            try:
                out.append(int(p.name[4:12]))
            except ValueError:
                continue
        return sorted(out)

    def _fd(self, segno: int) -> int:
        fd = self._fds.get(segno)
        if fd is None:
            fd = _open_segment(self.seg_path(segno))
            self._fds[segno] = fd
        return fd

    def _new_segment(self, segno: int) -> None:
        fd = _open_segment(self.seg_path(segno), os.O_CREAT | os.O_EXCL)
        os.pwrite(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, segno), 0)
        self._fds[segno] = fd
        self._dirty.add(segno)
        self.segno = segno
        self.end = SEGMENT_HEADER_SIZE
        if hasattr(self, "total_bytes"):
            self.total_bytes += SEGMENT_HEADER_SIZE
        # the new name is made durable by the next sync, with the records that need it: an fsync
        # of the directory here, under load, stalled every writer for up to half a second
        self._dir_dirty = True

    def new_segment(self, segno: int) -> None:
        """Start segment `segno` now. Segment numbers are never reused: when the newest segment
        the index knows is gone or cut short (from outside), new records go to a segment after
        it, or the index would read their offsets as the old records."""
        assert segno > self.segno
        self._new_segment(segno)

    def _sync_dir(self) -> None:
        self._dir_dirty = False
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def size_bytes(self) -> int:
        """Bytes on disk, counted afresh (total_bytes is the running count)."""
        return sum(os.path.getsize(self.seg_path(s)) for s in self.segment_numbers())

    # append ------------------------------------------------------------------------------
    def append(self, pieces: list[bytes | bytearray | memoryview], nbytes: int) -> tuple[int, int]:
        """Write `pieces` contiguously at the end with as few syscalls as possible.

        Returns (segno, offset) of the first byte. On a full disk the partial append is cut off
        again and NoSpace is raised, so the journal never holds half a batch.
        """
        if self.end >= (self.SEGMENT_LIMIT if self.cap is None else min(self.cap, self.SEGMENT_LIMIT)):
            self._new_segment(self.segno + 1)
        segno, start = self.segno, self.end
        fd = self._fd(segno)
        off = start
        try:
            i = 0
            while i < len(pieces):
                chunk = pieces[i : i + IOV_MAX]
                want = sum(len(p) for p in chunk)
                n = os.pwritev(fd, chunk, off)
                if n != want:  # rare (signals, odd filesystems): finish the chunk plainly
                    rest = b"".join(bytes(p) for p in chunk)[n:]
                    while rest:
                        k = os.pwrite(fd, rest, off + n)
                        n += k
                        rest = rest[k:]
                off += want
                i += IOV_MAX
        except OSError as e:
            os.ftruncate(fd, start)
            if e.errno in (28, 122):  # ENOSPC, EDQUOT
                raise NoSpace(f"no space left for the journal in {self.path}: free space or fade history") from e
            raise
        assert off - start == nbytes, (off - start, nbytes)
        self.end = off
        self.total_bytes += nbytes
        self._dirty.add(segno)
        return segno, start

    def sync(self) -> None:
        """Make every appended byte durable (group commit: called at FLUSH/FUA and on a timer)."""
        self.sync_fds(*self.take_dirty())

    def take_dirty(self) -> tuple[list[int], bool]:
        """The fds of segments written since the last sync, and whether a segment was created
        since (its directory entry needs a sync too); the caller syncs them, unlocked."""
        fds = [self._fds[s] for s in sorted(self._dirty) if s in self._fds]
        self._dirty.clear()
        new_name, self._dir_dirty = self._dir_dirty, False
        return fds, new_name

    def sync_fds(self, fds: list[int], new_name: bool = False) -> None:
        for fd in fds:
            try:
                os.fdatasync(fd)
            except OSError as e:
                if e.errno != errno.EBADF:  # closed meanwhile: close_segment synced it
                    raise
        if new_name:
            self._sync_dir()

    def truncate(self, segno: int, off: int) -> None:
        """Cut a torn tail: everything from `off` in `segno` and every later segment goes."""
        for s in self.segment_numbers():
            if s > segno:
                self.close_segment(s)
                os.unlink(self.seg_path(s))
        fd = self._fd(segno)
        if off < SEGMENT_HEADER_SIZE:  # torn while the segment was being created: start it afresh
            os.pwrite(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, segno), 0)
            off = SEGMENT_HEADER_SIZE
        os.ftruncate(fd, off)
        os.fsync(fd)
        self.segno, self.end = segno, off
        self.total_bytes = self.size_bytes()

    def close_segment(self, segno: int) -> None:
        fd = self._fds.pop(segno, None)
        if fd is not None:
            if segno in self._dirty:
                os.fdatasync(fd)
            os.close(fd)
        self._dirty.discard(segno)

    def close(self) -> None:
        for s in list(self._fds):
            self.close_segment(s)
        if self._dir_dirty:
            self._sync_dir()

    # read --------------------------------------------------------------------------------
    def pread(self, loc: int, n: int) -> bytes:
        segno, off = split_loc(loc)
        try:
            fd = self._fd(segno)
        except FileNotFoundError:
            raise CorruptionError(
                f"journal segment {segment_name(segno)} is missing (needed at offset {off})",
                str(self.seg_path(segno)),
                off,
            ) from None
        data = os.pread(fd, n, off)
        if len(data) != n:
            raise CorruptionError(
                f"{self.seg_path(segno)} offset {off}: journal is shorter than the index says",
                str(self.seg_path(segno)),
                off,
            )
        return data

    def read_block(self, loc: int, crc: int) -> bytes:
        """One block, checked against its crc; a mismatch is reported, never returned."""
        data = self.pread(loc, self.block_size)
        if crc32c(data) != crc:
            segno, off = split_loc(loc)
            raise CorruptionError(
                f"{self.seg_path(segno)} offset {off}: block checksum mismatch (journal data is damaged)",
                str(self.seg_path(segno)),
                off,
            )
        return data

    def first_seq(self, segno: int) -> int | None:
        """Seq of a segment's first record (None: empty, or not readable as one)."""
        try:
            with open(self.seg_path(segno), "rb", buffering=0) as f:
                f.seek(SEGMENT_HEADER_SIZE)
                return decode_header(f.read(HEADER_SIZE), self.block_size).seq
        except (OSError, HeaderError):
            return None

    # scan --------------------------------------------------------------------------------
    def scan(
        self,
        segno: int = 0,
        offset: int = 0,
        check_data: bool = True,
        strict: bool = True,
        end: tuple[int, int] | None = None,
    ) -> Iterator[Scanned]:
        """Yield every record from (segno, offset) on, in order.

        A record that does not check out raises TornTail if it is at the very end of the
        journal (a crash mid-append) and CorruptionError if valid data follows it.
        """
        bs = self.block_size
        for s in self.segment_numbers():
            if s < segno:
                continue
            if end is not None and s > end[0]:
                return  # appended after the caller looked: not its business
            path = self.seg_path(s)
            size = os.path.getsize(path)
            if end is not None and s == end[0]:
                size = min(size, end[1])
            with open(path, "rb", buffering=0) as f:
                head = f.read(SEGMENT_HEADER_SIZE)
                if len(head) < SEGMENT_HEADER_SIZE or SEGMENT_HEADER.unpack(head) != (SEGMENT_MAGIC, s):
                    self._bad(s, 0, "bad segment header", size)
                pos = offset if (s == segno and offset) else SEGMENT_HEADER_SIZE
                while pos < size:
                    f.seek(pos)
                    raw = f.read(HEADER_SIZE)
                    try:
                        hdr = decode_header(raw, bs)
                    except HeaderError as e:
                        self._bad(s, pos, str(e), size)
                    if pos + hdr.total > size:
                        self._bad(s, pos, "record runs past the end of its segment", size)
                    covered = f.read(hdr.table_len() if hdr.table_len() else hdr.paylen)
                    if not header_crc_ok(raw, covered):
                        self._bad(s, pos, "record header checksum mismatch", size)
                    name = ""
                    crcs: tuple[int, ...] = ()
                    bad: list[int] = []
                    if hdr.kind in (Kind.WRITE, Kind.BASELINE):
                        crcs = unpack_table(covered, hdr.count)
                        if check_data:
                            for i in range(hdr.count):
                                blk = f.read(bs)
                                if crc32c(blk) != crcs[i]:
                                    if not strict and len(blk) == bs:  # a sound record with a damaged block
                                        bad.append(i)
                                        continue
                                    self._bad(s, pos + HEADER_SIZE + 4 * hdr.count + i * bs,
                                              f"block checksum mismatch in record seq {hdr.seq}", size)
                    elif hdr.kind in (Kind.MARK, Kind.UNMARK):
                        name = covered.decode("utf-8", "replace")
                    yield Scanned(hdr, s, pos, crcs, name, tuple(bad))
                    pos += hdr.total

    def written_block_size(self) -> tuple[int, Path, int] | None:
        """The block size the journal was written with, read from the records themselves: the
        first WRITE or BASELINE record of the first and of the last segment whose header checks
        out (its crc covers count and paylen, and paylen = count x (4 + block size), so it needs
        no block size to be trusted). (block size, segment path, offset), or None when no such
        record is found near the start of those segments. A mismatch means store.json is wrong."""
        from .record import HEADER, MAGIC

        segs = self.segment_numbers()
        for s in dict.fromkeys((segs[0], segs[-1]) if segs else ()):
            path = self.seg_path(s)
            with open(path, "rb") as f:
                pos = SEGMENT_HEADER_SIZE
                for _ in range(1000):  # a few records: enough past the zeros and marks that may come first
                    f.seek(pos)
                    raw = f.read(HEADER_SIZE)
                    if len(raw) < HEADER_SIZE:
                        break
                    magic, kind, _fl, hlen, _seq, _t, _blk, count, paylen, _aux, _hcrc, _pad = HEADER.unpack(raw)
                    if magic != MAGIC or hlen != HEADER_SIZE or kind not in (1, 2, 3, 4, 5):
                        break
                    if kind in (Kind.WRITE, Kind.BASELINE):
                        if not 0 < count <= (64 << 20) // 512 or paylen % count:
                            break
                        if not header_crc_ok(raw, f.read(4 * count)):
                            break
                        return paylen // count - 4, path, pos
                    covered = f.read(paylen) if kind != Kind.ZERO else b""
                    if paylen > 4096 or not header_crc_ok(raw, covered):
                        break
                    pos += HEADER_SIZE + paylen
        return None

    def torn_ranges(self, segno: int, offset: int) -> list[tuple[int, int]]:
        """(block, count) of the WRITE/ZERO records whose headers survive in a torn tail."""
        out: list[tuple[int, int]] = []
        with open(self.seg_path(segno), "rb") as f:
            pos = offset
            while True:
                f.seek(pos)
                try:
                    hdr = decode_header(f.read(HEADER_SIZE), self.block_size)
                except HeaderError:
                    return out
                if hdr.kind in (Kind.WRITE, Kind.ZERO):
                    out.append((hdr.block, hdr.count))
                pos += hdr.total

    def _bad(self, segno: int, offset: int, reason: str, size: int) -> None:
        """Torn tail if this is the last segment and nothing valid follows; corruption otherwise."""
        if segno == self.segment_numbers()[-1] and not self._valid_record_after(segno, offset, size):
            raise TornTail(segno, offset, reason)
        path = self.seg_path(segno)
        raise CorruptionError(f"{path} offset {offset}: {reason}", str(path), offset)

    def _valid_record_after(self, segno: int, offset: int, size: int) -> bool:
        """Is there a well-formed header later in the segment? (then it is damage, not a tear)"""
        with open(self.seg_path(segno), "rb") as f:
            f.seek(offset + 1)
            buf = f.read(min(size - offset, 64 << 20))
        from .record import MAGIC

        i = buf.find(MAGIC)
        while i >= 0:
            raw = buf[i : i + HEADER_SIZE]
            try:
                hdr = decode_header(raw, self.block_size)
                covered = buf[i + HEADER_SIZE : i + HEADER_SIZE + (hdr.table_len() or hdr.paylen)]
                if header_crc_ok(raw, covered):
                    return True
            except HeaderError:
                pass
            i = buf.find(MAGIC, i + 1)
        return False


def first_loc() -> tuple[int, int]:
    """Where a journal's first record starts."""
    return 1, SEGMENT_HEADER_SIZE


__all__ = ["Journal", "Scanned", "TornTail", "make_loc", "split_loc", "zero_loc", "record_of_zero", "ZERO_LOC"]
