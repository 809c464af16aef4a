"""verify: every record's checksums, then every index entry against the journal it points into."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from ..errors import CorruptionError
from ..journal.record import Kind
from ..journal.segments import ZERO_LOC, TornTail, segment_name, split_loc
from . import Progress

if TYPE_CHECKING:
    from .store import Store


def verify_store(store: Store, check: Callable[[], None]) -> Generator[Progress, None, list[str]]:
    """Yield progress; return a list of problems, each naming the file and offset."""
    store._index_sync()
    problems: list[str] = []
    j = store.journal
    bs = store.block_size
    total = max(1, j.size_bytes())
    # per segment: sorted data-start offsets and (count, crcs) of WRITE/BASELINE records
    extents: dict[int, tuple[list[int], list[tuple[int, ...]]]] = {}
    done = 0
    last_seq = 0
    with store._lock:
        segs = j.segment_numbers()
    for segno in segs:
        starts: list[int] = []
        tables: list[tuple[int, ...]] = []
        extents[segno] = (starts, tables)
        try:
            with store._lock:
                it = list(_scan_one(store, segno))
            for rec in it:
                check()
                if rec.hdr.seq < last_seq:  # compaction splits a record into pieces of one seq
                    problems.append(
                        f"{j.seg_path(segno)} offset {rec.offset}: record seq {rec.hdr.seq} is out of order"
                    )
                last_seq = rec.hdr.seq
                for i in rec.bad:
                    problems.append(
                        f"{j.seg_path(segno)} offset {rec.data_off + i * bs}: block checksum mismatch"
                        f" (block {rec.hdr.block + i} of record seq {rec.hdr.seq})"
                    )
                if rec.hdr.kind in (Kind.WRITE, Kind.BASELINE):
                    starts.append(rec.data_off)
                    tables.append(rec.crcs)
                done += rec.hdr.total
                yield Progress("journal", min(done, total), total)
        except (CorruptionError, TornTail) as e:
            problems.append(str(e) if isinstance(e, CorruptionError) else f"{j.seg_path(segno)}: {e}")
    with store._lock:
        rows = list(store._db.all_versions())
    n = max(1, len(rows))
    for i, (block, seq, loc, crc) in enumerate(rows):
        if i % 4096 == 0:
            check()
            yield Progress("maps", i, n)
        if not 0 <= block < store.nblocks:
            problems.append(f"maps.db: version of block {block} (seq {seq}) is outside the volume")
            continue
        if loc == ZERO_LOC:
            continue
        segno, off = split_loc(loc)
        ext = extents.get(segno)
        where = f"{j.seg_path(segno) if ext else segment_name(segno)} offset {off}"
        if ext is None:
            problems.append(f"maps.db: block {block} seq {seq} points into missing segment {segment_name(segno)}")
            continue
        starts, tables = ext
        k = bisect.bisect_right(starts, off) - 1
        if k < 0 or (off - starts[k]) % bs or (off - starts[k]) // bs >= len(tables[k]):
            problems.append(f"maps.db: block {block} seq {seq} points to {where}, which is not a journaled block")
            continue
        if tables[k][(off - starts[k]) // bs] != crc:
            problems.append(f"maps.db: block {block} seq {seq}: checksum differs from the journal at {where}")
    yield Progress("maps", n, n)
    return problems


def _scan_one(store: Store, segno: int):  # type: ignore[no-untyped-def]
    """Records of one segment; corruption and torn tails surface as exceptions."""
    for rec in store.journal.scan(segno, 0, strict=False):
        if rec.segno != segno:
            return
        yield rec


__all__ = ["verify_store"]
