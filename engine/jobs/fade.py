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
import json
import os
import time
from collections.abc import Callable, Generator
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
from ..journal.segments import LOC_SHIFT, make_loc, record_of_zero, split_loc, zero_loc
from ..maps import MapDB, json_rows
from ..retention import Plan, plan, removable_versions
from ..safefile import open_private
from ..view import UNTOUCHED
from . import Progress

if TYPE_CHECKING:
    from .store import Store

CHUNK = 5000  # rows per delete transaction; the foreground gets the lock between chunks
COMPACT_BELOW = 0.5  # compact a segment when less than this share of its bytes is live


def fade_body(store: Store, check: Callable[[], None], throttle: float = 0.0,
              free: int = 0) -> Generator[Progress, None, dict[str, Any]]:
    """The fade job. `free` > 0: the space limit is reached, move the horizon past kept points
    too, far enough that about `free` bytes of the oldest segments hold nothing needed."""
    with store._maint:
        return (yield from _fade(store, check, throttle, free))


def _fade(store: Store, check: Callable[[], None], throttle: float,
          free: int) -> Generator[Progress, None, dict[str, Any]]:
    early = free > 0
    with store._lock:
        first_open = store.journal.segno  # segments before it are complete, and indexed below
    store._index_sync()
    store.checkpoint()  # a redo at the next open must never read a segment this fade rewrites
    t0 = time.monotonic()
    db = MapDB(store.dir / "maps.db")
    db.lock = store._commit_lock
    try:
        before = store.journal.size_bytes()
        old_h = store.horizon
        pinned = [m.seq for m in db.marks() if m.pinned]
        points = db.points(old_h)
        p = plan(points, store.clock(), store.policy(), pinned)
        if early:
            p = _early_plan(store, p, points, pinned, _seq_freeing(store, free, first_open))
        summary: dict[str, Any] = {"horizon_before": old_h, "kept_per_tier": p.per_tier, "early": early}
        if p.drop or (p.horizon is not None and p.horizon > old_h):
            _decide(store, db, p, points)
        yield Progress("merge", 0, 1)
        removed = yield from _remove_versions(store, db, check, throttle)
        released = yield from _release(store, db, check, throttle)
        deleted, compacted = yield from _reclaim(store, db, check, first_open)
        db.record_journal_size(store.clock() // 10**9, store.journal.total_bytes)
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


def fade_preview(store: Store, policy: str | None = None) -> dict[str, Any]:
    """What a fade would remove now under `policy` (the store's own when None); changes nothing.
    The console shows it before it fades: how many points go, which marks go (only marks that
    follow retention: a person's are kept until removed), and the oldest moment that stays."""
    from ..retention import Policy

    store._index_sync()
    pol = Policy.parse(policy) if policy is not None else store.policy()
    db = MapDB(store.dir / "maps.db", readonly=True)
    try:
        with store._lock:
            old_h, old_ns = store.horizon, int(store.meta["horizon_ns"])
        marks = db.marks()
        points = db.points(old_h)
    finally:
        db.close()
    p = plan(points, store.clock(), pol, [m.seq for m in marks if m.pinned])
    hz = p.horizon if p.horizon is not None and p.horizon > old_h else old_h
    drop = {s for s in p.drop if s != hz}
    gone = [m for m in marks if not m.pinned and (m.seq < hz or m.seq in drop)]
    limit = (store.retention().get("max_size") or 0)
    return {
        "policy": str(pol),
        "points": len(drop),
        "marks": [m.name for m in gone],
        "kept_marks": [m.name for m in marks if m.pinned],
        "horizon": {"seq": hz, "time_ns": store.point_time(hz) if hz != old_h else old_ns},
        "horizon_moves": hz != old_h,
        "over_limit": bool(limit) and store.space_used() > int(limit),
    }


def _seq_freeing(store: Store, free: int, first_open: int) -> int:
    """The newest seq such that the segments before it (oldest first, closed) hold `free` bytes:
    with the horizon there, what they hold is mostly not needed any more (the horizon's own
    version of each block rewritten since stays, and is compacted forward)."""
    j = store.journal
    with store._lock:
        segs = [s for s in j.segment_numbers() if s <= first_open]
    acc = 0
    for k, segno in enumerate(segs[:-1]):
        try:
            acc += j.seg_path(segno).stat().st_size
        except FileNotFoundError:
            continue
        if acc >= free:
            nxt = j.first_seq(segs[k + 1])
            if nxt is not None:
                return int(nxt) - 1
            break
    return int(store.head)


def _early_plan(store: Store, p: Plan, points: list[tuple[int, int]], pinned: list[int], upto: int) -> Plan:
    """Space limit: fade kept points too, up to the newest at or before `upto` (at least the
    oldest; the caller repeats while needed)."""
    kept = sorted(s for s in p.keep if s not in pinned and (p.horizon is None or s > p.horizon))
    if not kept:
        return p
    i = bisect.bisect_right(kept, upto)
    h = kept[i - 1] if i else kept[0]
    # a person's mark is kept until removed, space limit or not: history stops at the oldest one
    # (the limit is then exceeded rather than writes refused; the store says which mark holds it)
    old = p.horizon if p.horizon is not None else store.horizon
    held = sorted(s for s in pinned if old <= s < h)
    if held:
        h = held[0]
        store._space_held_by_mark(h)
    keep = {s for s in p.keep if s >= h}
    return Plan(keep, {s for s, _ in points} - keep, h, p.per_tier)


def _decide(store: Store, db: MapDB, p: Plan, points: list[tuple[int, int]]) -> None:
    """Record the decision first: store.json, then the records/marks/maps tables."""
    with store._turn():
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
        store.meta["fade_pending"] = True  # until the tables below agree (redone on open)
        store.meta["kept_until"] = max(cutoff, int(store.meta.get("kept_until", 0)))
        if hz > store.horizon:
            store.meta["horizon_seq"] = hz
            store.meta["horizon_ns"] = store.point_time(hz)
        store.save_meta()
    with db.write():
        db.drop_points(sorted(s for s in p.drop if s > hz), hz)
        db.db.execute("DELETE FROM maps WHERE last_seq<=?", (hz,))
        db.db.execute("UPDATE maps SET kind='merged' WHERE first_seq<=?", (store.meta["kept_until"],))
    with store._turn():
        store.meta.pop("fade_pending", None)
        store.save_meta()


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
    total = max(1, store.nblocks)
    # only blocks with something to merge come back, their versions as one JSON list: walking
    # every row from Python took and dropped the GIL per row, and the writers waited each time
    rows = db.db.execute(
        "SELECT block, json_group_array(seq) FROM versions GROUP BY block"
        " HAVING count(*) > 1 AND min(seq) <= ?",
        (cutoff,),
    )
    for i, (block, seqs_json) in enumerate(rows):
        seqs = sorted(int(v) for v in json.loads(seqs_json))  # (the scan's order, but it is not promised)
        doomed.extend((int(block), v) for v in removable_versions(seqs, kept, cutoff))
        if i % 4096 == 0:
            check()
            yield Progress("merge", min(int(block), total), total)
    removed = 0
    for i in range(0, len(doomed), CHUNK):
        check()
        with db.write():
            db.delete_versions(doomed[i : i + CHUNK])
        store.forget()
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
        for b, s in db.db.execute(
            "SELECT block, max(seq) FROM versions GROUP BY block HAVING count(*) = 1 AND max(seq) <= ?", (hz,)
        )
    ]
    released = 0
    if cand:  # an untouched block reads the primary: its last write must be there. Waited for
        # here, outside the store lock (under heavy writes that takes seconds), for every chunk:
        # a block released below still has the one version listed here
        store._applier.wait(max(s for _, s in cand))
    for i in range(0, len(cand), CHUNK):
        check()
        chunk = cand[i : i + CHUNK]
        with store._turn(commit=True):
            # look again under the lock: a block written since the listing (its row pending or
            # already committed) keeps its horizon version
            qs = ",".join("?" * len(chunk))
            now = {
                int(b): (int(c), int(mx))
                for b, c, mx in db.db.execute(
                    f"SELECT block, count(*), max(seq) FROM versions WHERE block IN ({qs}) GROUP BY block",
                    [b for b, _ in chunk],
                )
            }
            ok = [
                (b, s)
                for b, s in chunk
                if now.get(b) == (1, s) and all(g.lookup(b, 1 << 62) is None for g in (store._gen, *store._frozen))
            ]
            with db.write():
                db.delete_versions(ok)
            store.forget()
            for b, _ in ok:
                store._state[b] = UNTOUCHED  # a new baseline is taken on the next overwrite
        released += len(ok)
        yield Progress("release", min(i + CHUNK, len(cand)), len(cand))
        if throttle:
            time.sleep(throttle)
    return released


def _reclaim(store: Store, db: MapDB, check: Callable[[], None],
             first_open: int) -> Generator[Progress, None, tuple[int, int]]:
    """Delete dead segments and compact mostly dead ones, among those older than `first_open`
    (the segment being appended to when the fade began: everything before it was indexed then,
    and nothing new can point into it)."""
    j = store.journal
    bs = store.block_size
    store._applier.wait(store.head)  # no queued primary write may read from a segment we remove
    with store._lock:
        segs = [s for s in j.segment_numbers() if s < first_open]
    live: dict[int, int] = {}
    for seg, c in db.db.execute(
        f"SELECT CASE WHEN loc >= 0 THEN loc >> {LOC_SHIFT} ELSE (-1 - loc) >> {LOC_SHIFT} END, count(*)"
        " FROM versions GROUP BY 1"
    ):
        live[int(seg)] = int(c)
    mark_seqs = {(m.name, m.seq) for m in db.marks()}  # (name, the point it names) of every mark
    deleted = compacted = 0
    for k, segno in enumerate(segs):
        check()
        yield Progress("reclaim", k, len(segs))
        size = j.seg_path(segno).stat().st_size
        live_bytes = live.get(segno, 0) * (bs + 4 + HEADER_SIZE // 8)
        has_marks = live_bytes == 0 and _segment_marks(store, segno, mark_seqs)
        if live_bytes == 0 and not has_marks:
            with store._lock:
                store.forget()
                j.close_segment(segno)
                j.seg_path(segno).unlink(missing_ok=True)
                j.total_bytes -= size  # writers waiting for room at the space limit see it now
            deleted += 1
        elif live_bytes < COMPACT_BELOW * size:
            compact_segment(store, db, segno, mark_seqs)
            with store._lock:
                j.total_bytes -= size - j.seg_path(segno).stat().st_size
            compacted += 1
    with store._lock:
        j.total_bytes = j.size_bytes()
    yield Progress("reclaim", len(segs), len(segs))
    return deleted, compacted


def _live_mark(rec: Any, mark_seqs: set[tuple[str, int]]) -> bool:
    """A MARK record of a mark that exists (a MARK `--at` an earlier point names it in `aux`);
    UNMARK records and marks removed or faded are dead."""
    return rec.hdr.kind == Kind.MARK and (rec.name, rec.hdr.aux or rec.hdr.seq) in mark_seqs


def _segment_marks(store: Store, segno: int, mark_seqs: set[tuple[str, int]]) -> bool:
    return any(_live_mark(r, mark_seqs) for r in store.journal.scan(segno, 0, check_data=False) if r.segno == segno)


def _runs(rows: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """Split (block, seq, loc, crc) rows, sorted by block, into runs of consecutive blocks."""
    out: list[list[tuple[int, int, int, int]]] = []
    for row in rows:
        if out and row[0] == out[-1][-1][0] + 1:
            out[-1].append(row)
        else:
            out.append([row])
    return out


def compact_segment(store: Store, db: MapDB, segno: int, mark_seqs: set[tuple[str, int]]) -> None:
    """Copy the live records of one segment into a new file, repoint the index, swap the files.

    Live: WRITE/BASELINE blocks some version still points at, ZERO records some version still
    points at (their blocks read as zeros), and MARK records of existing marks. Records keep their
    seq and time; a record with dead blocks in the middle is split into pieces.
    """
    j = store.journal
    bs = store.block_size
    lo, hi = segno << LOC_SHIFT, (segno + 1) << LOC_SHIFT
    rows = [
        (int(b), int(s), int(loc), int(c))
        for b, s, loc, c in db.db.execute(
            "SELECT block, seq, loc, crc FROM versions WHERE (loc>=? AND loc<?) OR (loc<=? AND loc>?)",
            (lo, hi, -1 - lo, -1 - hi),
        )
    ]
    recs = [r for r in j.scan(segno, 0, check_data=False) if r.segno == segno]
    starts = [r.data_off for r in recs]
    heads = {r.offset: k for k, r in enumerate(recs)}
    by_rec: dict[int, list[tuple[int, int, int, int]]] = {}
    for row in rows:
        if row[2] < 0:
            k = heads.get(record_of_zero(row[2])[1], -1)
        else:
            k = bisect.bisect_right(starts, split_loc(row[2])[1]) - 1
        if k < 0:
            raise CorruptionError(f"{j.seg_path(segno)}: an index entry points between records; run verify",
                                  str(j.seg_path(segno)))
        by_rec.setdefault(k, []).append(row)
    new_path = j.seg_path(segno).with_name(j.seg_path(segno).name + ".new")
    moves: list[tuple[int, int, int]] = []  # (new loc, block, seq)
    with open(open_private(new_path), "wb") as out, open(j.seg_path(segno), "rb") as src:
        out.write(SEGMENT_HEADER.pack(SEGMENT_MAGIC, segno))
        pos = SEGMENT_HEADER_SIZE
        for k, rec in enumerate(recs):
            h = rec.hdr
            if _live_mark(rec, mark_seqs):
                src.seek(rec.offset)
                raw = src.read(h.total)
                out.write(raw)
                pos += len(raw)
                continue
            for run in _runs(sorted(by_rec.get(k, []))):
                if h.kind == Kind.ZERO:
                    hdr = encode_header(h.kind, h.seq, h.time_ns, run[0][0], len(run), 0, h.aux, b"")
                    moves.extend((zero_loc(segno, pos), b, sq) for b, sq, _l, _c in run)
                    out.write(hdr)
                    pos += len(hdr)
                    continue
                datas = []
                for _b, _s, loc, c in run:
                    off = split_loc(loc)[1]
                    src.seek(off)
                    d = src.read(bs)
                    if crc32c(d) != c:
                        raise CorruptionError(f"{j.seg_path(segno)} offset {off}: checksum mismatch while compacting",
                                              str(j.seg_path(segno)), off)
                    datas.append(d)
                table = pack_table([r[3] for r in run])
                data = b"".join(datas)
                hdr = encode_header(h.kind, h.seq, h.time_ns, run[0][0], len(run), len(table) + len(data), h.aux, table)
                dstart = pos + HEADER_SIZE + len(table)
                out.write(hdr + table + data)
                pos += len(hdr) + len(table) + len(data)
                moves.extend((make_loc(segno, dstart + i * bs), r[0], r[1]) for i, r in enumerate(run))
        out.flush()
        os.fsync(out.fileno())
    with store._turn(commit=True):
        with db.write():
            db.set_meta("compacting", segno)
            db.db.execute(
                "UPDATE versions SET loc = j.value->>0 FROM json_each(?) AS j"
                " WHERE versions.block = j.value->>1 AND versions.seq = j.value->>2",
                (json_rows(moves),),
            )
            store.forget()
        j.close_segment(segno)
        os.rename(new_path, j.seg_path(segno))
        _fsync_dir(j.path)
        with db.write():
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
        with db.write():
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


__all__ = ["fade_body", "compact_segment", "finish_compaction"]
