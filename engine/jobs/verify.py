"""verify: every record's checksums, then every index entry against the journal it points into."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from ..errors import CorruptionError
from ..journal.record import Kind
from ..journal.segments import TornTail, record_of_zero, split_loc
from ..maps import MapDB
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
    sizes = {s: j.seg_path(s).stat().st_size if s != end[0] else end[1] for s in segs}
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
    missing: dict[int, list[int]] = {}  # segno -> [versions, lowest seq, highest seq]
    cut: dict[int, list[int]] = {}  # the same, for versions past the end of a segment
    for i, (block, seq, loc, crc) in enumerate(rows):
        if i % 4096 == 0:
            check()
            yield Progress("maps", i, n)
        if not 0 <= block < store.nblocks:
            problems.append(f"maps.db: version of block {block} (seq {seq}) is outside the volume")
            continue
        segno, off = record_of_zero(loc) if loc < 0 else split_loc(loc)
        ext = extents.get(segno)
        if ext is None:
            # rows were read with `end`, so they point before it; a segment past it that is not
            # there was deleted (a missing newest segment must not pass as "written since")
            if segno > end[0] and j.seg_path(segno).exists():
                continue
            m = missing.setdefault(segno, [0, seq, seq])
            m[0], m[1], m[2] = m[0] + 1, min(m[1], seq), max(m[2], seq)
            continue
        if (segno, off) >= end or off >= sizes[segno]:
            # rows were read with `end`: they point before it unless the segment was cut short
            m = cut.setdefault(segno, [0, seq, seq])
            m[0], m[1], m[2] = m[0] + 1, min(m[1], seq), max(m[2], seq)
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
    for segno, (count, lo, hi) in sorted(missing.items()):
        problems.append(
            f"{j.seg_path(segno)}: journal segment is missing, but maps.db has {count} block versions in it"
            f" (seq {lo} to {hi}): points that need them cannot be read"
        )
    for segno in store.missing_segments:  # found on open: gone, though no block version needs it
        if segno not in missing:
            problems.append(f"{j.seg_path(segno)}: journal segment is missing: the index knew it; its records are lost")
    for segno, (count, lo, hi) in sorted(cut.items()):
        problems.append(
            f"{j.seg_path(segno)}: journal segment is shorter than maps.db says: {count} block versions"
            f" (seq {lo} to {hi}) point past its end ({sizes[segno]} bytes): points that need them cannot be read"
        )
    # SQLite's own structure check, on a connection of its own (writers go on meanwhile)
    db = MapDB(store.dir / "maps.db", readonly=True)
    try:
        check_rows = [str(r[0]) for r in db.db.execute("PRAGMA quick_check").fetchall()]
    finally:
        db.close()
    if check_rows != ["ok"]:
        problems += [
            f"{store.dir / 'maps.db'}: {' '.join(r.split())[:300]} (run `rewind verify {store.dir} --repair`)"
            for r in check_rows[:5]
        ]
    yield Progress("maps", n, n)
    return problems
