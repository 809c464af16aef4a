"""Reading the volume at a point in time, and the Volume objects front ends serve.

Block b at point S is the newest version of b with seq <= S (pending generations first, then one
SQLite b-tree descent); with none, zeros if the block has versions (a hole at the horizon, first
written after S), else the primary's current contents. Contiguous runs are read with one pread.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import NoSpace, PointError, ReadOnlyError
from .journal.record import crc32c, zero_crc
from .maps import MapDB, Version

if TYPE_CHECKING:
    from .store import Req, Store, _Gen

VCACHE_MAX = 1 << 18  # cached past lookups (about 100 bytes each)
WARM_CHUNK = 256  # blocks per query of view.warm
RANGE_QUERY_MIN = 16  # blocks: from here on one SQL query resolves the whole range

# Per-block state in the store's copy-on-first-write bitmap.
UNTOUCHED = 0  # no version since the horizon; primary still holds its horizon contents
TOUCHED = 1  # has versions in the index
HOLE = 2  # untouched and a hole in the image: its horizon contents are zeros, no baseline needed
# In the store's last-write array (per block, the seq of its newest write): unknown, a seq too big
# for 32 bits; ask the index
LAST_NONE = 0xFFFFFFFF


class Volume:
    """The live volume (read-write) or a past point (read-only): what front ends serve."""

    def __init__(self, store: Store, seq: int | None) -> None:
        self._store = store
        self._seq = seq
        self.size = store.size
        self.block_size = store.block_size
        self.readonly = seq is not None

    @property
    def seq(self) -> int:
        return self._store.head if self._seq is None else self._seq

    @property
    def time_ns(self) -> int:
        return self._store.point_time(self.seq)

    def read(self, off: int, n: int) -> bytes:
        return self._store._read(self._seq, off, n)

    def read_many(self, reqs: list[tuple[int, int]]) -> list[bytes | Exception]:
        """Several reads at once (a front end's queue): the data, or the error, of each."""
        if self._seq is None:
            return [_guarded(read_at, self._store, None, off, n) for off, n in reqs]
        return read_many(self._store, self._seq, reqs)

    def _rw(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"the volume at seq:{self._seq} is read-only: export it or rewind to it")

    def write(self, off: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._rw()
        self._store._write_many([("write", off, data)], fua)

    def zero(self, off: int, n: int, fua: bool = False) -> None:
        self._rw()
        self._store._write_many([("zero", off, n)], fua)

    def trim(self, off: int, n: int, fua: bool = False) -> None:
        self._rw()
        self._store._write_many([("trim", off, n)], fua)

    def write_many(self, reqs: list[Req], fua: bool = False) -> None:
        self._rw()
        self._store._write_many(reqs, fua)

    def flush(self, primary: bool = False) -> None:
        if not self.readonly:
            self._store.flush(primary)

    def warm(self) -> None:
        """About to be served for a while: look up the changed blocks' versions in advance."""
        if self._seq is not None:
            self._store.warm(self._seq)

    def changes_since(self, point: str | int) -> list[tuple[int, int]]:
        return self._store.diff(point, self.seq)


def version_at(store: Store, block: int, seq: int) -> Version | None:
    """Newest version of `block` at or before `seq`: pending generations, then SQLite.

    Answers for points older than the head are cached: later writes come after them and cannot
    change the answer; a fade that deletes or moves versions clears the cache (store.forget)."""
    v = _known_version(store, (store._gen, *reversed(store._frozen)), block, seq)
    if v is None:
        v = store._db.newest(block, seq)
        if v is not None:
            _remember(store, seq, {block: v})
    return v


def _known_version(store: Store, gens: tuple[_Gen, ...], block: int, seq: int) -> Version | None:
    """The version from the cache or the pending generations (cached too), else None."""
    v = store._vcache.get((block, seq))
    if v is not None:
        return v
    for gen in gens:
        v = gen.lookup(block, seq)
        if v is not None:
            _remember(store, seq, {block: v})
            return v
    return None


def _remember(store: Store, seq: int, found: dict[int, Version]) -> None:
    if seq >= store._head:  # a later write could still land at or before `seq`
        return
    cache = store._vcache
    if len(cache) + len(found) > VCACHE_MAX:
        cache.clear()
    cache.update(((b, seq), v) for b, v in found.items())


def read_at(store: Store, seq: int | None, off: int, n: int, indexed: bool = False) -> bytes:
    store._check_range(off, n)
    if n == 0:
        return b""
    if seq is None and not indexed:
        return read_live(store, off, n)
    last = None if indexed or seq is None else _fast_past(store, seq)
    if last is not None and seq is not None:
        data = _read_unchanged(store, last, seq, off, n)
        if data is not None:
            return data
    with store._turn():
        if seq is None or (seq >= store._head and not indexed):
            return read_live(store, off, n)
        return _read_past(store, seq, off, n, last)


def read_live(store: Store, off: int, n: int) -> bytes:
    """The live volume: the primary, except blocks whose newest write is still queued for it
    (the applier is lazy), which are read from the journal, as a past read of the head. The
    caller checks the range (read_at, and the read-modify-write of a checked write)."""
    ap = store._applier
    last = store._last
    if last is None:  # without the last-write array the applier is never lazy: wait for it
        try:
            ap.wait(store._head)
            return store._primary.pread(off, n)
        except NoSpace:  # the primary's disk is full: what it lacks is in the journal
            with store._turn():
                return _read_past(store, store._head, off, n, None)
    if n == 0:
        return b""
    data = _read_unchanged(store, last, store._head, off, n)  # their newest writes have landed
    if data is not None:
        return data
    with store._turn():
        return _read_past(store, store._head, off, n, last)


def _read_past(store: Store, seq: int, off: int, n: int, last: array[int] | None) -> bytes:
    """Read [off, off+n) at `seq` (call under the store lock): versions from the pending
    generations and the index, blocks with none from the primary."""
    if seq < int(store.meta["horizon_seq"]):
        raise PointError(f"seq:{seq} is older than the horizon")
    store._addressable(seq, f"seq:{seq}")  # a view held across a fade must not read merged data
    bs = store.block_size
    a, e = off // bs, -(-(off + n) // bs)
    if e - a == 1:  # the common small read: no run bookkeeping
        return _read_one_block(store, a, seq)[off - a * bs : off - a * bs + n]
    out = bytearray((e - a) * bs)
    prim_run: list[int] = []  # [start, end) block run read from the primary
    jrun: list[int] = []  # [start block, end block, first loc] contiguous in the journal
    jcrcs: list[int] = []

    def flush_prim() -> None:
        if prim_run:
            s, t = prim_run
            out[(s - a) * bs : (t - a) * bs] = store._primary.pread(s * bs, (t - s) * bs)
            prim_run.clear()

    def flush_journal() -> None:
        if jrun:
            s, t, loc = jrun
            _read_journal_run(store, out, (s - a) * bs, loc, jcrcs)
            jrun.clear()
            jcrcs.clear()

    lookup = _range_lookup(store, a, e, seq) if e - a >= RANGE_QUERY_MIN else None
    applied = 0 if last is None else store._applier.applied  # no applier yet during recovery
    for b in range(a, e):
        lb = LAST_NONE if last is None else last[b]
        unchanged = lb <= seq and lb <= applied and lb != LAST_NONE
        # unchanged: the primary holds the block as it was at `seq`
        v = None if unchanged else version_at(store, b, seq) if lookup is None else lookup(b)
        if v is None:
            flush_journal()
            if not unchanged and store._state[b] == TOUCHED:
                flush_prim()
                continue  # a hole at the horizon, first written after `seq`
            if prim_run and prim_run[1] == b:
                prim_run[1] = b + 1
            else:
                flush_prim()
                prim_run[:] = [b, b + 1]
            continue
        flush_prim()
        _, loc, crc = v
        if loc < 0:  # a ZERO record
            flush_journal()
            continue
        if jrun and jrun[1] == b and jrun[2] + (b - jrun[0]) * bs == loc:
            jrun[1] = b + 1
            jcrcs.append(crc)
        else:
            flush_journal()
            jrun[:] = [b, b + 1, loc]
            jcrcs.append(crc)
    flush_prim()
    flush_journal()
    lo = off - a * bs
    return bytes(out[lo : lo + n])


def _fast_past(store: Store, seq: int) -> array[int] | None:
    """The last-write array, if reads of `seq` may take the fast path (an addressable point
    older than the head); raises PointError for a point merged away by retention."""
    last = store._last
    if last is None or seq >= store._head or seq < store.horizon:
        return None  # the slow path says why, or reads pending versions
    store._addressable(seq, f"seq:{seq}")  # a view held across a fade must not read merged data
    return last


def _read_unchanged(store: Store, last: array[int], seq: int, off: int, n: int) -> bytes | None:
    """The fast path of past reads: blocks with no version newer than `seq` hold on the primary
    what they held at `seq`. Reads the primary without the store lock, then checks that no write
    to the range was staged meanwhile (staging comes before the primary write); None if any was."""
    bs = store.block_size
    a, e = off // bs, -(-(off + n) // bs)
    # `applied` before `last`: a write seen in `last` at or below it was written, not skipped (a
    # skip needs a later write in `last` first, and `last` only grows)
    applied = store._applier.applied
    newest = last[a] if e - a == 1 else max(last[a:e])
    if newest > seq or newest == LAST_NONE:  # LAST_NONE: a seq too big to keep, ask the index
        return None
    if applied < newest:  # the primary does not hold them yet: read the journal
        return None
    data = store._primary.pread(off, n)
    if (last[a] if e - a == 1 else max(last[a:e])) > seq:
        return None
    return data


def _guarded(fn: Callable[..., bytes], *args: Any) -> bytes | Exception:
    try:
        return fn(*args)
    except Exception as e:  # reported per request: one bad block must not fail its neighbours
        return e


def read_many(store: Store, seq: int, reqs: list[tuple[int, int]]) -> list[bytes | Exception]:
    """Reads of one past point: unchanged blocks from the primary; the single-block reads left
    are looked up together (one SQL statement for all, not one each), the rest one by one.

    The loop is _read_unchanged inlined for single-block reads (a front end's 4 KiB reads are
    most of them): `applied` once before any `last`, then one re-check of `last` after all the
    primary reads; a block written meanwhile goes the slow way."""
    out: list[bytes | Exception | None] = [None] * len(reqs)
    try:
        last = _fast_past(store, seq)
    except Exception as exc:
        return [exc] * len(reqs)
    bs = store.block_size
    size = store.size
    singles: list[int] = []
    unsure: list[int] = []  # requests that need the slow path, single-block or not
    hits: list[int] = []  # single-block requests read from the primary: re-checked below
    if last is not None:
        applied = store._applier.applied  # before `last`: see _read_unchanged
        pread = store._primary.pread
        for i, (off, n) in enumerate(reqs):
            b = off // bs
            if n <= 0 or off < 0 or off + n > size or (off + n - 1) // bs != b:
                unsure.append(i)
                continue
            lb = last[b]
            if lb <= seq and lb <= applied and lb != LAST_NONE:
                try:
                    out[i] = pread(off, n)
                except Exception as e:  # reported per request, like any other read error
                    out[i] = e
                    continue
                hits.append(i)
            else:
                singles.append(i)
        for i in hits:  # a write staged since the check may have reached the primary first
            off = reqs[i][0]
            if last[off // bs] > seq:
                out[i] = None
                singles.append(i)
    else:
        unsure = list(range(len(reqs)))
    for i in unsure:
        out[i] = _guarded(read_at, store, seq, *reqs[i])
    if len(singles) == 1:
        i = singles[0]
        out[i] = _guarded(read_at, store, seq, *reqs[i])
    elif singles:
        try:
            with store._turn():
                if seq < store.horizon:
                    raise PointError(f"seq:{seq} is older than the horizon")
                store._addressable(seq, f"seq:{seq}")
                blocks = sorted({reqs[i][0] // bs for i in singles})
                found = _versions_many(store, blocks, seq)
                for i in singles:
                    off, n = reqs[i]
                    b = off // bs
                    try:
                        data = _block_data(store, b, found.get(b))
                    except Exception as e:
                        out[i] = e
                    else:
                        out[i] = data[off - b * bs : off - b * bs + n]
        except Exception as e:
            for i in singles:
                if out[i] is None:
                    out[i] = e
    return out  # type: ignore[return-value]


def warm(store: Store, seq: int) -> None:
    """Fill the lookup cache for `seq` (store.warm's thread): the blocks written since `seq`, from
    the last-write array, looked up in chunks on a connection of its own (SQLite runs without the
    GIL). Only a point the index covers whole (pending rows would be missed), and only as many
    blocks as the cache holds; a fade that drops the cache meanwhile ends it (what it found may be
    stale)."""
    last = store._last
    with store._lock:
        cache = store._vcache
        if last is None or not store.horizon <= seq < store._head:
            return
        if seq > store._indexed_seq:  # not yet: the next open tries again
            store._warmed.discard(seq)
            return
        room = (VCACHE_MAX - len(cache)) // 2
    blocks: list[int] = []
    for i in range(0, len(last), 1 << 12):
        part = last[i : i + (1 << 12)]
        if max(part) <= seq:  # (in C) most of a big volume is skipped here
            continue
        if store._stop.is_set():
            return
        blocks.extend(b for b, s in enumerate(part, i) if s > seq)  # LAST_NONE too
        if len(blocks) > room:
            return  # more than the cache keeps: leave them to the reads
    if not blocks:
        return
    db = MapDB(store.dir / "maps.db", readonly=True)
    try:
        for i in range(0, len(blocks), WARM_CHUNK):
            if store._stop.is_set():
                return
            got = db.newest_many(blocks[i : i + WARM_CHUNK], seq)
            with store._lock:
                if store._vcache is not cache or len(cache) + len(got) > VCACHE_MAX:
                    return
                cache.update(((b, seq), v) for b, v in got.items())
    finally:
        db.close()


def _versions_many(store: Store, blocks: list[int], seq: int) -> dict[int, Version]:
    """version_at for many blocks: cache and pending generations first, then one SQL query."""
    found: dict[int, Version] = {}
    ask: list[int] = []
    gens = (store._gen, *reversed(store._frozen))
    for b in blocks:
        v = _known_version(store, gens, b, seq)
        if v is None:
            ask.append(b)
        else:
            found[b] = v
    if ask:
        got = store._db.newest_many(ask, seq)
        found.update(got)
        _remember(store, seq, got)
    return found


def _block_data(store: Store, b: int, v: Version | None) -> bytes:
    """Block b's contents given its version at the point (None: it has none there)."""
    bs = store.block_size
    if v is None:
        return bytes(bs) if store._state[b] == TOUCHED else store._primary.pread(b * bs, bs)
    if v[1] < 0:
        return bytes(bs)
    return store.journal.read_block(v[1], v[2])


def _read_one_block(store: Store, b: int, seq: int) -> bytes:
    return _block_data(store, b, version_at(store, b, seq))


def _range_lookup(store: Store, a: int, e: int, seq: int) -> Callable[[int], Version | None]:
    """Versions for a whole range: pending generations per block, the database in one query."""
    found = store._db.newest_range(a, e, seq)
    gens = (store._gen, *reversed(store._frozen))

    def lookup(b: int) -> Version | None:
        for gen in gens:
            v = gen.lookup(b, seq)
            if v is not None:
                return v
        return found.get(b)

    return lookup


def _read_journal_run(store: Store, out: bytearray, pos: int, loc: int, crcs: list[int]) -> None:

    bs = store.block_size
    data = store.journal.pread(loc, len(crcs) * bs)
    mv = memoryview(data)
    for i, c in enumerate(crcs):
        if crc32c(mv[i * bs : (i + 1) * bs]) != c:
            store.journal.read_block(loc + i * bs, c)  # raises CorruptionError with the location
    out[pos : pos + len(data)] = data


def changed_blocks(store: Store, sa: int, sb: int) -> list[int]:
    """Blocks whose contents differ between two points, found from the maps (claim 3)."""
    if sa > sb:
        sa, sb = sb, sa
    if sa == sb:
        return []
    store._index_sync(reading=True)
    with store._lock:
        cand: set[int] = set()
        for blk, cnt in store._db.changed_between(sa, sb):
            cand.update(range(blk, blk + cnt))
        out = []
        for blk in sorted(cand):
            if block_identity(store, blk, sa) != block_identity(store, blk, sb):
                if read_at(store, sa, blk * store.block_size, store.block_size) != store._read(
                    sb, blk * store.block_size, store.block_size
                ):
                    out.append(blk)
        return out

def block_identity(store: Store, block: int, seq: int) -> tuple[int, int]:
    """(kind, crc) identity of a block's contents at `seq`, without reading it when possible."""
    v = version_at(store, block, seq)
    if v is None:
        if store._state[block] == TOUCHED:
            return (0, zero_crc(store.block_size))
        return (1, block)  # still the horizon contents in the primary
    if v[1] < 0:
        return (0, zero_crc(store.block_size))
    return (0, v[2])
