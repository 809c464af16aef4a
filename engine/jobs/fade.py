"""fade: carry out the retention policy (merge same-expiry maps, fade old history, free space).

Steps, each safe to interrupt with kill -9 (the next fade or open finishes or undoes it):
1. decide (retention.plan) and record the decision in store.json: the new horizon and the kept
   points; from then on dropped points are refused, and nothing a kept point reads is touched;
2. mark dropped records gone, forget records and unpinned marks below the horizon;
3. delete versions that no kept point reads any more (merge and fade, claims 6 and 7);
4. release blocks whose only version is the current contents: the primary holds them already;
5. reclaim segments: delete the dead, compact the mostly dead (copy live records forward into a
   new file, repoint the index in one transaction, then rename over the old one).
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Generator
from itertools import groupby
from typing import TYPE_CHECKING, Any

from ..errors import CorruptionError
from ..journal.record import (
    HEADER_SIZE,
    SEGMENT_HEADER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    Kind,
    crc32c,
    encode_header,
    pack_table,
)
from ..journal.segments import LOC_SHIFT, ZERO_LOC, make_loc, split_loc
from ..maps import MapDB
from ..retention import Plan, plan, removable_versions
from ..view import UNTOUCHED
from . import Progress

if TYPE_CHECKING:
    from .store import Store

CHUNK = 5000  # rows per delete transaction; the foreground gets the lock between chunks
COMPACT_BELOW = 0.5  # compact a segment when less than this share of its bytes is live


def fade_body(store: Store, check: Callable[[], None], throttle: float = 0.0,
              early: bool = False) -> Generator[Progress, None, dict[str, Any]]:
    """The fade job. `early`: the space limit is reached, move the horizon past kept points too."""
    store._index_sync()
    t0 = time.monotonic()
    db = MapDB(store.dir / "maps.db")
    try:
        before = store.journal.size_bytes()
        old_h = store.horizon
        pinned = [m.seq for m in db.marks() if m.pinned]
        points = db.points(old_h)
        p = plan(points, store.clock(), store.policy(), pinned)
        if early:
            p = _early_plan(store, p, points, pinned)
        summary: dict[str, Any] = {"horizon_before": old_h, "kept_per_tier": p.per_tier, "early": early}
        if p.drop or (p.horizon is not None and p.horizon > old_h):
            _decide(store, db, p, points)
        yield Progress("merge", 0, 1)
        removed = yield from _remove_versions(store, db, check, throttle)
        released = yield from _release(store, db, check, throttle)
        deleted, compacted = yield from _reclaim(store, db, check)
        summary.update(
            horizon=store.horizon,
            points_dropped=len(p.drop),
            versions_removed=removed,
            blocks_released=released,
            segments_deleted=deleted,
            segments_compacted=compacted,
            journal_before=before,
            journal_after=store.journal.size_bytes(),
            seconds=round(time.monotonic() - t0, 3),
        )
        store._emit("fade", summary)
        return summary
    finally:
        db.close()


def _early_plan(store: Store, p: Plan, points: list[tuple[int, int]], pinned: list[int]) -> Plan:
    """Space limit: fade the oldest kept point too (one step; the caller repeats while needed)."""
    kept = sorted(s for s in p.keep if s not in pinned and (p.horizon is None or s > p.horizon))
    if not kept:
        return p
    h = kept[0]
    keep = {s for s in p.keep if s >= h}
    return Plan(keep, {s for s, _ in points} - keep, h, p.per_tier)


def _decide(store: Store, db: MapDB, p: Plan, points: list[tuple[int, int]]) -> None:
    """Record the decision first: store.json, then the records/marks/maps tables."""
    with store._lock:
        hz = p.horizon if p.horizon is not None else store.horizon
        seqs = [s for s, _ in points]
        # everything above `cutoff` stays; at or below it only `kept`
        cutoff = hz
        for s in reversed(seqs):
            if s not in p.keep:
                cutoff = s
                break
        kept = sorted(s for s in p.keep if hz <= s <= cutoff)
        old_kept = [s for s in store.meta.get("kept", []) if s >= hz and s not in p.drop]
        store.meta["kept"] = sorted(set(kept) | set(old_kept))
        store.meta["kept_until"] = max(cutoff, int(store.meta.get("kept_until", 0)))
        if hz > store.horizon:
            store.meta["horizon_seq"] = hz
            store.meta["horizon_ns"] = store.point_time(hz)
        store.save_meta()
    with db.db:
        db.db.executemany("UPDATE records SET gone=1 WHERE seq=?", [(s,) for s in sorted(p.drop) if s > hz])
        db.db.execute("DELETE FROM records WHERE seq<?", (hz,))
        db.db.execute("DELETE FROM marks WHERE pinned=0 AND seq<?", (hz,))
        db.db.execute("DELETE FROM marks WHERE pinned=0 AND seq IN (SELECT seq FROM records WHERE gone=1)")
        db.db.execute("DELETE FROM maps WHERE last_seq<=?", (hz,))
        db.db.execute("UPDATE maps SET kind='merged' WHERE first_seq<=?", (store.meta["kept_until"],))


def _retained(store: Store) -> tuple[list[int], int]:
    with store._lock:
        kept = sorted(set(store.meta.get("kept", [])) | {store.horizon})
        return kept, max(int(store.meta.get("kept_until", 0)), store.horizon)


def _remove_versions(store: Store, db: MapDB, check: Callable[[], None],
                     throttle: float) -> Generator[Progress, None, int]:
    kept, cutoff = _retained(store)
    if cutoff <= 0:
        return 0
    doomed: list[tuple[int, int]] = []
    total = max(1, db.count("versions"))
    n = 0
    rows = db.db.execute("SELECT block, seq FROM versions ORDER BY block, seq")
    for block, grp in groupby(rows, key=lambda r: r[0]):
        seqs = [int(r[1]) for r in grp]
        n += len(seqs)
        if len(seqs) > 1 and seqs[0] <= cutoff:
            doomed.extend((block, v) for v in removable_versions(seqs, kept, cutoff))
        if n % 65536 < len(seqs):
            check()
            yield Progress("merge", n, total)
    removed = 0
    for i in range(0, len(doomed), CHUNK):
        check()
        with db.db:
            db.db.executemany("DELETE FROM versions WHERE block=? AND seq=?", doomed[i : i + CHUNK])
        removed += len(doomed[i : i + CHUNK])
        yield Progress("merge", removed, len(doomed))
        if throttle:
            time.sleep(throttle)
    return removed


def _release(store: Store, db: MapDB, check: Callable[[], None],
             throttle: float) -> Generator[Progress, None, int]:
    """Blocks whose one version is at or below the horizon and current: the primary has it."""
    hz = store.horizon
    cand = [
        (int(b), int(s))
        for b, s, c in db.db.execute("SELECT block, max(seq), count(*) FROM versions GROUP BY block")
        if c == 1 and s <= hz
    ]
    released = 0
    for i in range(0, len(cand), CHUNK):
        check()
        chunk = cand[i : i + CHUNK]
        with store._lock:
            ok = [
                (b, s)
                for b, s in chunk
                if all(g.lookup(b, 1 << 62) is None for g in (store._gen, *store._frozen))
            ]
            with db.db:
                db.db.executemany("DELETE FROM versions WHERE block=? AND seq=?", ok)
            for b, _ in ok:
                store._state[b] = UNTOUCHED  # a new baseline is taken on the next overwrite
        released += len(ok)
        yield Progress("release", min(i + CHUNK, len(cand)), len(cand))
        if throttle:
            time.sleep(throttle)
    return released


def _reclaim(store: Store, db: MapDB, check: Callable[[], None]) -> Generator[Progress, None, tuple[int, int]]:
    j = store.journal
    bs = store.block_size
    store._applier.wait(store.head)  # no queued primary write may read from a segment we remove
    with store._lock:
        segs = j.segment_numbers()
        active = j.segno
    live: dict[int, int] = {
        int(s): int(c)
        for s, c in db.db.execute(f"SELECT loc >> {LOC_SHIFT}, count(*) FROM versions WHERE loc >= 0 GROUP BY 1")
    }
    mark_seqs = {m.seq for m in db.marks()}
    deleted = compacted = 0
    for k, segno in enumerate(segs):
        check()
        yield Progress("reclaim", k, len(segs))
        if segno == active:
            continue
        size = j.seg_path(segno).stat().st_size
        live_bytes = live.get(segno, 0) * (bs + 4 + HEADER_SIZE // 8)
        has_marks = live_bytes == 0 and _segment_marks(store, segno, mark_seqs)
        if live_bytes == 0 and not has_marks:
            with store._lock:
                j.close_segment(segno)
                j.seg_path(segno).unlink(missing_ok=True)
            deleted += 1
        elif live_bytes < COMPACT_BELOW * size:
            compact_segment(store, db, segno, mark_seqs)
            compacted += 1
    with store._lock:
        j.total_bytes = j.size_bytes()
    yield Progress("reclaim", len(segs), len(segs))
    return deleted, compacted


def _segment_marks(store: Store, segno: int, mark_seqs: set[int]) -> bool:
    return any(
        r.hdr.kind == Kind.MARK and r.hdr.seq in mark_seqs
        for r in store.journal.scan(segno, 0, check_data=False)
        if r.segno == segno
    )


def compact_segment(store: Store, db: MapDB, segno: int, mark_seqs: set[int]) -> None:
    """Copy the live records of one segment into a new file, repoint the index, swap the files."""
    j = store.journal
    bs = store.block_size
    lo, hi = segno << LOC_SHIFT, (segno + 1) << LOC_SHIFT
    rows = sorted(
        (int(loc), int(b), int(s), int(c))
        for b, s, loc, c in db.db.execute(
            "SELECT block, seq, loc, crc FROM versions WHERE loc>=? AND loc<?", (lo, hi)
        )
    )
    recs = [r for r in j.scan(segno, 0, check_data=False) if r.segno == segno]
    starts = [r.data_off for r in recs]
    new_path = j.seg_path(segno).with_name(j.seg_path(segno).name + ".new")
    moves: list[tuple[int, int, int]] = []  # (new loc, block, seq)
    with open(new_path, "wb") as out, open(j.seg_path(segno), "rb") as src:
        out.write(SEGMENT_HEADER.pack(SEGMENT_MAGIC, segno))
        pos = SEGMENT_HEADER_SIZE
        # group live rows by their record, then by runs of consecutive blocks
        by_rec: dict[int, list[tuple[int, int, int, int]]] = {}
        for row in rows:
            k = bisect.bisect_right(starts, split_loc(row[0])[1]) - 1
            by_rec.setdefault(k, []).append(row)
        for k, rec in enumerate(recs):
            h = rec.hdr
            if h.kind == Kind.MARK and h.seq in mark_seqs:
                src.seek(rec.offset)
                raw = src.read(h.total)
                out.write(raw)
                pos += len(raw)
                continue
            if k not in by_rec:
                continue
            live = sorted(by_rec[k], key=lambda r: r[1])
            run: list[tuple[int, int, int, int]] = []
            for row in live + [(-1, -2, 0, 0)]:
                if run and row[1] == run[-1][1] + 1:
                    run.append(row)
                    continue
                if run:
                    datas = []
                    for loc, _b, _s, c in run:
                        src.seek(split_loc(loc)[1])
                        d = src.read(bs)
                        if crc32c(d) != c:
                            raise CorruptionError(
                                f"{j.seg_path(segno)} offset {split_loc(loc)[1]}: checksum mismatch while compacting",
                                str(j.seg_path(segno)), split_loc(loc)[1])
                        datas.append(d)
                    crcs = [r[3] for r in run]
                    table = pack_table(crcs)
                    data = b"".join(datas)
                    hdr = encode_header(h.kind, h.seq, h.time_ns, run[0][1], len(run),
                                        len(table) + len(data), h.aux, table)
                    dstart = pos + HEADER_SIZE + len(table)
                    out.write(hdr + table + data)
                    pos += len(hdr) + len(table) + len(data)
                    moves.extend((make_loc(segno, dstart + i * bs), r[1], r[2]) for i, r in enumerate(run))
                run = [row] if row[0] != -1 else []
        out.flush()
        os.fsync(out.fileno())
    with store._lock:
        with db.db:
            db.set_meta("compacting", segno)
            db.db.executemany("UPDATE versions SET loc=? WHERE block=? AND seq=?", moves)
        j.close_segment(segno)
        os.rename(new_path, j.seg_path(segno))
        _fsync_dir(j.path)
        with db.db:
            db.db.execute("DELETE FROM meta WHERE key='compacting'")


def finish_compaction(store_dir_journal: Any, db: MapDB) -> str | None:
    """On open: complete or undo a compaction a crash interrupted. Returns a note or None."""
    seg = db.get_meta("compacting")
    note = None
    for p in store_dir_journal.glob("seg-*.rwj.new"):
        target = p.with_name(p.name[: -len(".new")])
        if seg is not None and target.name == f"seg-{int(seg):08d}.rwj":
            os.rename(p, target)  # the index already points into the new file
            note = f"finished compacting {target.name} after an interrupted fade"
        else:
            p.unlink()  # the index never pointed into it
            note = f"removed an unfinished compaction of {target.name}"
    if seg is not None:
        with db.db:
            db.db.execute("DELETE FROM meta WHERE key='compacting'")
    if note:
        _fsync_dir(store_dir_journal)
    return note


def _fsync_dir(path: Any) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["fade_body", "compact_segment", "finish_compaction", "ZERO_LOC"]
