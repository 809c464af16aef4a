"""verify: every record's checksums, then every index entry against the journal it points into."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from ..errors import CorruptionError
from ..journal.record import Kind
from ..journal.segments import TornTail, record_of_zero, segment_name, split_loc
from . import Progress

if TYPE_CHECKING:
    from .store import Store


def verify_store(store: Store, check: Callable[[], None]) -> Generator[Progress, None, list[str]]:
    """Yield progress; return a list of problems, each naming the file and offset."""
    with store._maint:  # a fade would delete or compact segments under the scan
        return (yield from _verify(store, check))


def _verify(store: Store, check: Callable[[], None]) -> Generator[Progress, None, list[str]]:
    store._index_sync(reading=True)
    problems: list[str] = []
    j = store.journal
    bs = store.block_size
    total = max(1, j.size_bytes())
    # per segment: sorted data-start offsets and crc tables of WRITE/BASELINE records, and the
    # header offsets of ZERO records; only what existed when verify began is judged
    extents: dict[int, tuple[list[int], list[tuple[int, ...]]]] = {}
    zeros: dict[int, set[int]] = {}
    done = 0
    last_seq = 0
    with store._lock:
        segs = j.segment_numbers()
        end = (j.segno, j.end)
        rows = list(store._db.all_versions())
    for segno in segs:
        starts: list[int] = []
        tables: list[tuple[int, ...]] = []
        extents[segno] = (starts, tables)
        zeros[segno] = set()
        try:
            for rec in j.scan(segno, 0, strict=False, end=end):
                if rec.segno != segno:
                    break
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
                elif rec.hdr.kind == Kind.ZERO:
                    zeros[segno].add(rec.offset)
                done += rec.hdr.total
                yield Progress("journal", min(done, total), total)
        except (CorruptionError, TornTail) as e:
            problems.append(str(e) if isinstance(e, CorruptionError) else f"{j.seg_path(segno)}: {e}")
    n = max(1, len(rows))
    for i, (block, seq, loc, crc) in enumerate(rows):
        if i % 4096 == 0:
            check()
            yield Progress("maps", i, n)
        if not 0 <= block < store.nblocks:
            problems.append(f"maps.db: version of block {block} (seq {seq}) is outside the volume")
            continue
        segno, off = record_of_zero(loc) if loc < 0 else split_loc(loc)
        if (segno, off) >= end:
            continue  # written after verify began
        ext = extents.get(segno)
        if ext is None:
            problems.append(f"maps.db: block {block} seq {seq} points into missing segment {segment_name(segno)}")
            continue
        where = f"{j.seg_path(segno)} offset {off}"
        if loc < 0:
            if off not in zeros[segno]:
                problems.append(f"maps.db: block {block} seq {seq} points to {where}, which is not a ZERO record")
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
