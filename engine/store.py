"""Store: one protection (a primary volume and its secondary volume), the engine's public face.

Write path (PERFORMANCE.md): every request of a batch becomes journal records appended with one
writev, then the primary is written; index rows go to an in-memory generation that a background
indexer thread commits to SQLite in big transactions. Reads of a past point consult the pending
generations first, then SQLite: one b-tree descent per block.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import os
import re
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import apsw

from . import applier, view
from .applier import Op
from .errors import BadInput, CorruptionError, NoSpace, PointError, RewindError, StoreLocked
from .jobs import Job, Progress
from .jobs.fade import finish_compaction
from .journal.record import (
    HEADER_SIZE,
    MAX_RECORD_BYTES,
    Kind,
    block_crcs,
    crc32c,
    encode_header,
    encode_one_block,
    pack_table,
)
from .journal.segments import Journal, TornTail, make_loc, segment_name, zero_loc
from .maps import MapDB, MapInfo, Mark, Version
from .points import check_mark_name, format_ns, parse_point
from .primary import Primary
from .retention import DEFAULT_POLICY, Policy
from .safefile import create_new, open_private, tighten
from .view import HOLE, LAST_NONE, TOUCHED, UNTOUCHED, Volume

FORMAT = 1
FUTURE_SKEW_NS = 2 * 10**9  # clocks of two machines (a client naming a time) may differ this much
AUTO_MARK = re.compile(r"before-rewind-\d+|demo-\d+-\d+-files")  # names the program gives its marks
# record kinds as plain ints: comparing with an IntEnum member costs six times more on the hot path
K_WRITE, K_BASELINE, K_ZERO, K_MARK, K_UNMARK = (int(k) for k in (Kind.WRITE, Kind.BASELINE, Kind.ZERO, Kind.MARK, Kind.UNMARK))
MAP_SPAN_NS = 60 * 10**9  # a new delta map at least every minute of writes
INDEX_BATCH_ROWS = 200_000
INDEX_COMMIT_ROWS = INDEX_BATCH_ROWS // 2  # the indexer commits at this many pending rows...
INDEX_MAX_AGE_S = 2.0  # ...or when the oldest has waited this long (the journal has them all)
INDEX_MAX_PENDING = 1_000_000  # rows not yet committed before writers wait for the indexer
SYNC_INTERVAL_S = 1.0  # group commit: appended records become durable within this, or at FLUSH/FUA
CHECKPOINT_S = 30.0  # the primary is synced (and the redo start moved on) at least this often...
CHECKPOINT_BYTES = 2 << 30  # ...or when this much journal lies past the redo start (bounds the redo at open)
WRITE_RECORD_BYTES = 32 << 20
_HOLE_BYTE = bytes([HOLE])
SPACE_SEGMENTS = 8  # under a space limit, segments are at most limit/8: a fade frees whole segments...
MIN_SEGMENT = 1 << 20  # ...but not smaller than this
FADED_EARLY_KEPT = 10  # store.json remembers this many early fades (retention() shows them)
FADED_NOTE_S = 30.0  # background early fades are noted (store.json, the console) at most this often
SPACE_WAIT_S = 60.0  # a writer past the limit waits this long for a fade to make room, then fails
LAST_MAX_BLOCKS = 1 << 25  # volumes up to this many blocks keep the last-write array (4 bytes a block)
assert WRITE_RECORD_BYTES <= MAX_RECORD_BYTES


Listener = Callable[[str, dict[str, Any]], None]
Req = tuple[str, int, Any]


@dataclass
class StatRow:
    """Writes in one second of history and the journal's size at its end."""

    t: int
    writes: int
    bytes: int
    journal_bytes: int


@dataclass
class _Gen:
    """Index rows not yet in SQLite. Lookups search these before the database."""

    blocks: dict[int, list[Version]] = field(default_factory=dict)
    versions: list[tuple[int, int, int, int]] = field(default_factory=list)
    records: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    marks: list[tuple[str, int, int, int]] = field(default_factory=list)
    unmarks: list[str] = field(default_factory=list)
    last_seq: int = 0
    end_pos: tuple[int, int] = (0, 0)
    born: float = field(default_factory=time.monotonic)
    nindexed: int = 0  # versions[:nindexed] are in `blocks` (one-block writes add theirs; the rest is built lazily)

    def lookup(self, block: int, seq: int) -> Version | None:
        """Newest pending version of `block` at or before `seq`."""
        v = self.versions
        if self.nindexed < len(v):
            blocks = self.blocks
            for i in range(self.nindexed, len(v)):
                b, sq, loc, crc = v[i]
                lst = blocks.get(b)
                if lst is None:
                    blocks[b] = [(sq, loc, crc)]
                else:
                    lst.append((sq, loc, crc))
                    if sq < lst[-2][0]:  # baselines (keyed at the horizon) arrive after newer rows
                        lst.sort()
            self.nindexed = len(v)
        lst = self.blocks.get(block)
        if lst:
            for ver in reversed(lst):
                if ver[0] <= seq:
                    return ver
        return None

    def add_mark(self, name: str, seq: int, t: int, pinned: int) -> None:
        """A mark made in this generation (an earlier removal of the same name is overtaken)."""
        if name in self.unmarks:
            self.unmarks.remove(name)
        self.marks = [m for m in self.marks if m[0] != name]
        self.marks.append((name, seq, t, pinned))

    def drop_mark(self, name: str) -> None:
        """A mark removed in this generation (commit deletes it from the index)."""
        self.marks = [m for m in self.marks if m[0] != name]
        self.unmarks.append(name)

    def empty(self) -> bool:
        return not (self.versions or self.records or self.marks or self.unmarks or self.last_seq)


class Store:
    """One protection. Create with Store.create, open with Store.open; thread-safe."""

    # construction ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        primary: str | Path,
        store_dir: str | Path,
        size: int | None = None,
        block_size: int = 4096,
        clock: Callable[[], int] | None = None,
    ) -> Store:
        """Start protecting `primary` with its history in `store_dir`; no copy is made."""
        d = Path(store_dir).absolute()
        p = Path(primary).absolute()
        if block_size < 512 or block_size > (1 << 20) or block_size & (block_size - 1):
            raise BadInput(f"block size {block_size} is not a power of two between 512 and 1M")
        if (d / "store.json").exists():
            raise BadInput(f"{d} already holds a protection: open it, or pick an empty directory")
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise BadInput(f"{d} exists and is not an empty directory: pick a new directory for the store")
        if d.exists() and d.stat().st_uid != os.geteuid():  # its owner could read or swap our files
            raise BadInput(f"{d} belongs to another user (uid {d.stat().st_uid}): pick a directory you own "
                           "or a new path for the store")
        if not d.parent.is_dir():
            raise BadInput(f"{d.parent} does not exist: create it first")
        if p == d or d in p.parents:
            raise BadInput("the primary volume cannot live inside its own store")
        if size is not None and size <= 0:
            raise BadInput("--size must be positive")
        if not p.exists():
            if size is None:
                raise BadInput(f"{p} does not exist: give --size to create a new sparse image")
            if not p.parent.is_dir():
                raise BadInput(f"{p.parent} does not exist: create it first")
            if size % block_size:
                raise BadInput(f"size {size} is not a multiple of the block size {block_size}")
            fd = create_new(p)  # 0600, and never through a link planted at that name
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        prim = Primary(p)
        try:
            if size is not None and prim.size != size:
                raise BadInput(f"{p} exists with size {prim.size}, not {size}: drop --size to protect it as it is")
            if prim.size == 0:
                raise BadInput(f"{p} is empty: give a volume with data or create one with --size")
            if prim.size % block_size:
                raise BadInput(
                    f"{p} is {prim.size} bytes, not a multiple of the block size {block_size}: use --block-size 512"
                )
            vol_size = prim.size
        finally:
            prim.close()
        now = (clock or time.time_ns)()
        notes: list[str] = []
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:  # the empty directory checked above: the history must be private
            if d.stat().st_mode & 0o077:
                d.chmod(0o700)
                notes.append(f"{d} was readable by other users: made it private (0700)")
        (d / "journal").mkdir(mode=0o700)
        os.close(create_new(d / "maps.db"))  # SQLite keeps an empty file's mode 0600, and gives it to -wal/-shm
        meta = {
            "format": FORMAT,
            "uuid": str(uuid.uuid4()),
            "primary": str(p),
            "size": vol_size,
            "block_size": block_size,
            "created_ns": now,
            "horizon_seq": 0,
            "horizon_ns": now,
            "mode": "mirror",
            "marks_owned": 1,  # marks are a person's (pinned) or the program's (see _own_marks)
        }
        _write_json(d / "store.json", meta)
        store = cls.open(d, clock=clock)
        store.recovery[:0] = notes
        return store

    @classmethod
    def open(cls, store_dir: str | Path, clock: Callable[[], int] | None = None) -> Store:
        """Open a protection; takes its lock, cuts a torn journal tail and completes the index."""
        d = Path(store_dir).absolute()
        if not (d / "store.json").is_file():
            raise BadInput(f"{d} is not a Rewind store (no store.json): check the path or run `rewind protect`")
        return cls(d, clock)

    @classmethod
    def set_aside_index(cls, store_dir: str | Path) -> tuple[Path, bool]:
        """`verify --repair`: move maps.db (and its WAL) aside, never deleting it, so the next open
        rebuilds the index from the journal. Done under the store's lock: not while it is served.
        Returns where it went, and whether the redo start could be read from it (see _salvage_meta)."""
        d = Path(store_dir).absolute()
        if not (d / "store.json").is_file():
            raise BadInput(f"{d} is not a Rewind store (no store.json): check the path")
        fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreLocked(f"store {d} is in use (rewind serve?): stop it, then run the repair again") from None
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside, n = d / f"maps.db.damaged-{stamp}", 0
            while aside.exists():
                n += 1
                aside = d / f"maps.db.damaged-{stamp}.{n}"
            for x in ("", "-wal", "-shm"):
                src = d / f"maps.db{x}"
                if src.exists():
                    os.rename(src, aside.with_name(aside.name + x))
            saved = _salvage_meta(aside)
            if saved:  # the new index starts with them: the redo start, and segment numbers used
                db = MapDB(d / "maps.db")
                try:
                    with db.write():
                        for k, v in saved.items():
                            db.set_meta(k, v)
                finally:
                    db.close()
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return aside, "redo_segno" in saved
        finally:
            os.close(fd)

    def __init__(self, d: Path, clock: Callable[[], int] | None) -> None:
        self.dir = d
        self.meta, meta_checksum = _read_json(d / "store.json")
        self.clock: Callable[[], int] = clock or time.time_ns
        self.primary_path: str = self.meta["primary"]
        self.size: int = self.meta["size"]
        self.block_size: int = self.meta["block_size"]
        self.nblocks = self.size // self.block_size
        self.recovery: list[str] = []
        self.damage: list[str] = []  # found on open and not repairable here (a missing segment)
        self.missing_segments: list[int] = []  # segments the index knew that are gone (verify reports them)
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._commit_lock = threading.RLock()  # one SQLite writer at a time; before _lock if both
        self._maint = threading.Lock()
        self._waiting = 0  # threads other than the writer waiting for _lock (see _turn)
        self._lock_counter = threading.Lock()  # one of fade / verify at a time: both walk the segments
        self._closed = False
        self._lockfd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lockfd, 64, 0).decode(errors="replace").strip()
            os.close(self._lockfd)
            raise StoreLocked(
                f"store {d} is in use by another rewind process{f' (pid {holder})' if holder else ''}:"
                " stop it, or talk to it through its control socket"
            ) from None
        os.ftruncate(self._lockfd, 0)
        os.pwrite(self._lockfd, str(os.getpid()).encode(), 0)
        self.recovery += tighten(d)  # a store made by an older version, or chmod-ed since: private again
        try:
            self._db, self._wdb = _open_maps(d), _open_maps(d)
            self._wdb.lock = self._commit_lock
            with _maps_damage(d):
                # the newest segment the index may point into: segment numbers are never reused
                marks = [self._wdb.get_meta(k) for k in ("segno_hwm", "indexed_segno", "redo_segno")]
                self._segno_hwm = max([int(x) for x in marks if x is not None] or [0])
            self.journal = Journal(d / "journal", self.block_size, first_segno=self._segno_hwm + 1)
            with _maps_damage(d):
                self._check_description(meta_checksum)
            self._primary = Primary(self.primary_path)
            if self._primary.size != self.size:
                if meta_checksum == "ok":
                    raise CorruptionError(
                        f"primary {self.primary_path} is {self._primary.size} bytes but store.json (checked) says"
                        f" {self.size}: it was resized outside Rewind; restore its size",
                        self.primary_path,
                    )
                raise CorruptionError(
                    f"primary {self.primary_path} is {self._primary.size} bytes but store.json (with no checksum"
                    f" to confirm it) says {self.size}: either store.json was edited or the primary was resized;"
                    " compare with the size the volume should have before changing either",
                    str(d / "store.json"),
                )
            self._gen = _Gen()
            self._frozen: list[_Gen] = []
            self._indexed_pos = (0, 0)  # journal position the index covers (set by _recover)
            self._redo_pos: tuple[int, int] | None = None  # where the next open's redo starts (set by _recover)
            self._checkpoint_t = time.monotonic()
            self._checkpoint_bytes = self.journal.total_bytes
            self._vcache: dict[tuple[int, int], Version] = {}  # see view.version_at
            with _maps_damage(d):
                note = finish_compaction(self.journal.path, self._wdb)
                if note:
                    self.recovery.append(note)
                self._check_segments()
                self._recover()
                self._own_marks()
                if self._cut_segment or self.journal.segno < self._segno_hwm:
                    self.journal.new_segment(max(self.journal.segno, self._segno_hwm) + 1)
                self._build_state()
                if meta_checksum == "missing":  # checked against the journal and maps.db above: seal it
                    self.save_meta()
                    self.recovery.append("store.json had no checksum: checked it against the journal and sealed it")
        except BaseException:
            self._release()
            raise
        self._dirty = False
        self._last_sync = time.monotonic()
        self._applier = applier.Applier(self._primary, self.journal, self._head, self.block_size)
        self._applier.last = self._last
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._indexer = threading.Thread(target=self._index_loop, name="rewind-indexer", daemon=True)
        self._indexer.start()
        self._ckpt_wake = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="rewind-checkpoint", daemon=True)
        self._checkpointer.start()
        self._warmer: threading.Thread | None = None  # view.warm, one point at a time
        self._warmed: set[int] = set()
        self.live = Volume(self, None)
        self._refuse_full = self.retention()["on_full"] == "refuse"
        self._retaining = False  # a background retention thread runs (serve): it fades at the limit
        self._space_wake = threading.Event()  # the journal nears its limit: fade now
        self._space_high: int | None = None  # journal bytes that start a fade (None: no limit to keep)
        self._faded_unnoted = 0  # early fade steps not yet noted (see fade)
        self._space_held_at: int | None = None  # an early fade stopped at this person's mark
        self._faded_noted_t = -FADED_NOTE_S  # the first is noted at once
        self._set_space_limit()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush everything, stop the indexer, release the lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._ckpt_wake.set()
        self._indexer.join()
        self._checkpointer.join()
        if self._warmer is not None:
            self._warmer.join()
        try:
            try:
                self.flush(primary=True)
                self._index_sync()
                self.checkpoint()
            except NoSpace as e:  # the journal holds everything; the next open indexes and redoes it
                self._sync_journal()
                self._emit("error", {"message": str(e)})
        finally:
            self._applier.close()
            self._release()

    def _release(self) -> None:
        for name in ("_db", "_wdb"):
            db = getattr(self, name, None)
            if db is not None:
                db.close()
        j = getattr(self, "journal", None)
        if j is not None:
            j.close()
        p = getattr(self, "_primary", None)
        if p is not None:
            p.close()
        if self._lockfd >= 0:
            os.close(self._lockfd)
            self._lockfd = -1

    # checks on open ----------------------------------------------------------------------
    def _check_description(self, checksum: str) -> None:
        """store.json is trusted only once it agrees with the journal and maps.db (invariant 6):
        a wrong block size or size there would make every past read return wrong bytes, with no
        checksum failing. A disagreement names store.json and the field, and nothing is served."""
        path = self.dir / "store.json"
        db = self._wdb
        for table in ("meta", "marks", "maps"):  # small: a damaged one must not pass for an empty one
            got = [str(r[0]) for r in db.db.execute(f"PRAGMA quick_check({table})").fetchall()]
            if got != ["ok"]:
                raise apsw.CorruptError(f"table {table}: {' '.join(got[0].split())[:200]}")
        bad: list[str] = []
        try:
            known = json.loads(db.get_meta("store") or "{}")
        except ValueError:
            known = {}
        for k in ("uuid", "size", "block_size"):
            if k in known and self.meta.get(k) != known[k]:
                bad.append(f"field {k!r} is {self.meta.get(k)!r} but maps.db recorded {known[k]!r}")
        seen = self.journal.written_block_size()
        if seen is not None and seen[0] != self.block_size:
            bad.append(
                f"field 'block_size' is {self.block_size} but the journal was written with {seen[0]}-byte blocks"
                f" ({seen[1].name} offset {seen[2]})"
            )
        top = db.one("SELECT max(block) FROM versions")
        if top is not None and int(top) >= self.nblocks:
            bad.append(f"field 'size' is {self.size} but maps.db indexes block {top} (byte {int(top) * self.block_size})")
        if checksum == "bad" and not any("'size'" in b for b in bad):  # store.json changed: which field?
            try:
                prim = Primary(self.primary_path, readonly=True)
                psize = prim.size
                prim.close()
            except (BadInput, OSError):
                psize = self.size  # missing or unreadable: reported when it is opened below
            if psize != self.size:
                bad.append(f"field 'size' is {self.size} but the primary {self.primary_path} is {psize} bytes")
        indexed = db.get_meta("indexed_seq")
        if indexed is not None and self.horizon > int(indexed):
            bad.append(f"field 'horizon_seq' is {self.horizon}, past the newest indexed record (seq {indexed})")
        if bad:
            if checksum == "bad":
                bad.append("its checksum does not match either")
            raise CorruptionError(
                f"{path}: {'; '.join(dict.fromkeys(bad))}: store.json was changed outside Rewind or is damaged;"
                " nothing is served until it is put right (restore it from a backup, or put back the value"
                " named above)",
                str(path),
            )
        if checksum == "bad":
            raise CorruptionError(
                f"{path}: checksum mismatch: store.json was changed outside Rewind or is damaged (its fields"
                " agree with the journal and maps.db as far as they can be checked); if you edited it on purpose,"
                ' delete its "checksum" line and open it again to have it checked and sealed',
                str(path),
            )
        want = {"uuid": self.meta.get("uuid"), "size": self.size, "block_size": self.block_size}
        if known != want:
            with db.write():
                db.set_meta("store", json.dumps(want))

    def _check_segments(self) -> None:
        """The index may point into segments up to the high-water mark: if the newest of them is
        gone (deleted, or a truncated copy), say so and which points suffer; new records go to a
        fresh segment number, never to a reused one (whose offsets the index would misread)."""
        db = self._wdb
        have = [s for s in self.journal.segment_numbers() if s <= self._segno_hwm]
        newest = have[-1] if have else 0
        for s in range(newest + 1, self._segno_hwm + 1):
            self._report_missing(s)
        isegno, ioff = db.get_meta("indexed_segno"), db.get_meta("indexed_off")
        self._cut_segment = False
        if isegno is not None and int(isegno) in have:
            size = self.journal.seg_path(int(isegno)).stat().st_size
            if size < int(ioff):
                self._cut_segment = True  # new records must not land where the index expects old ones
                self.damage.append(
                    f"{self.journal.seg_path(int(isegno))} is {size} bytes but the index covers it up to offset"
                    f" {ioff}: indexed records were cut off; points that need them cannot be read"
                    f" (`rewind verify {self.dir}` lists them)"
                )

    def _report_missing(self, segno: int) -> None:
        lo, hi = make_loc(segno, 0), make_loc(segno + 1, 0)
        n, s0, s1 = self._wdb.db.execute(
            "SELECT count(*), min(seq), max(seq) FROM versions WHERE (loc >= ? AND loc < ?) OR (loc <= ? AND loc > ?)",
            (lo, hi, -1 - lo, -1 - hi),
        ).fetchall()[0]
        self.missing_segments.append(segno)
        held = (
            f"maps.db has {n} block versions in it (seq {s0} to {s1}); points that need them cannot be read"
            if n
            else "its records are lost, though maps.db has no block versions in it (no past read needs it)"
        )
        self.damage.append(
            f"journal segment {self.journal.seg_path(segno)} is missing: {held} (`rewind verify {self.dir}`"
            " lists the problems); new records go to later segments"
        )

    # recovery ----------------------------------------------------------------------------
    def _recover(self) -> None:
        """Index what the journal holds past the index, cut a torn tail, redo it on the primary."""
        db = self._wdb
        self._head = int(db.get_meta("indexed_seq", self.meta["horizon_seq"]))
        self._last_time = int(db.get_meta("indexed_time", self.meta["horizon_ns"]))
        segno = int(db.get_meta("indexed_segno", 0))
        off = int(db.get_meta("indexed_off", 0))
        indexed_pos = (segno, off)
        # records from the redo start on may be indexed but not yet durable on the primary
        # (a store without them is new, or from before checkpoints: its primary is whole up to the index)
        rsegno, roff = db.get_meta("redo_segno"), db.get_meta("redo_off")
        self._redo_pos = None if rsegno is None else (int(rsegno), int(roff))
        if self._redo_pos is not None and self._redo_pos < (segno, off):
            segno, off = self._redo_pos
        self._map_id = int(db.get_meta("map_id", 0))
        self._map_first = (int(db.get_meta("map_first_seq", 0)), int(db.get_meta("map_first_time", 0)))
        self._mark_pending_roll = False
        gen = self._gen
        bs = self.block_size
        redo = 0
        torn: list[tuple[int, int]] = []
        rebuild = db.get_meta("indexed_seq") is None
        # a rebuild starts from a whole primary, unless `verify --repair` saved where the damaged
        # index's redo started: then the records from there on are redone, as on any open
        redo_from = self._redo_pos if rebuild and self._redo_pos is not None else (1 << 62, 0)
        first_new = self._head + 1 if not rebuild else 0
        try:
            for rec in self.journal.scan(segno, off):
                h = rec.hdr
                # redo: every write from the redo start on goes on the primary again (a rebuild
                # starts from a primary that is whole)
                if h.kind == K_WRITE and (not rebuild or (rec.segno, rec.offset) >= redo_from):
                    self._primary.pwrite(h.block * bs, self.journal.pread(make_loc(rec.segno, rec.data_off), h.count * bs))
                    redo += 1
                elif h.kind == K_ZERO and (not rebuild or (rec.segno, rec.offset) >= redo_from):
                    self._primary.zero(h.block * bs, h.count * bs)
                    redo += 1
                if h.seq < first_new:
                    continue  # indexed already
                self._head = max(self._head, h.seq)
                self._last_time = max(self._last_time, h.time_ns)
                if h.kind in (K_WRITE, K_BASELINE):
                    key = h.aux if h.kind == K_BASELINE else h.seq
                    loc0 = make_loc(rec.segno, rec.data_off)
                    gen.versions.extend(
                        zip(range(h.block, h.block + h.count), repeat(key), range(loc0, loc0 + h.count * bs, bs), rec.crcs)
                    )
                elif h.kind == K_ZERO:
                    zl = zero_loc(rec.segno, rec.offset)
                    gen.versions.extend(zip(range(h.block, h.block + h.count), repeat(h.seq), repeat(zl), repeat(0)))
                if h.kind != K_BASELINE:
                    self._add_record(gen, h.seq, h.time_ns, int(h.kind), h.block, h.count)
                if h.kind == K_MARK:
                    # aux: the earlier point it names (`mark --at`), block: that point's time
                    gen.add_mark(rec.name, h.aux or h.seq, h.block if h.aux else h.time_ns, 0)
                elif h.kind == K_UNMARK:
                    gen.drop_mark(rec.name)
                gen.last_seq = h.seq
                gen.end_pos = (rec.segno, rec.end)
        except TornTail as t:
            lost = self.journal.seg_path(t.segno).stat().st_size - t.offset
            torn = self.journal.torn_ranges(t.segno, t.offset)
            self.journal.truncate(t.segno, t.offset)
            self.recovery.append(
                f"cut a torn journal tail at {segment_name(t.segno)} offset {t.offset} ({lost} bytes: {t.reason});"
                " it held only writes that were never flushed"
            )
        if redo:
            self._primary.sync()
            self.recovery.append(f"re-applied {redo} journaled writes to the primary after an unclean stop")
        # the redo above was synced: the primary is durable up to the index now
        self._indexed_pos = gen.end_pos if not gen.empty() else indexed_pos
        if not gen.empty():
            self._commit(gen, redo_from=gen.end_pos)
        elif redo:
            self._set_redo_start(indexed_pos)
        self._gen = _Gen()
        self._indexed_seq = self._head
        if torn:
            self._undo_torn(torn)
        if rebuild or self.meta.get("fade_pending"):
            self._reapply_retention(release=rebuild)
            if self.meta.pop("fade_pending", None):
                self.save_meta()
                self.recovery.append("finished recording an interrupted fade")
        if rebuild:
            if self._head > self.horizon:
                self.recovery.append(f"rebuilt the delta maps from the journal ({self._head} records)")
            else:  # a new store: nothing to rebuild, just remember where the index stands
                with db.write():
                    db.set_meta("indexed_seq", self._head)
                    db.set_meta("indexed_segno", 1)
                    db.set_meta("indexed_off", 16)
                self._indexed_pos = (1, 16)
        if self._redo_pos is None:
            self._set_redo_start(self._indexed_pos)

    def _own_marks(self) -> None:
        """Stores from before marks belonged to a person (store.json without `marks_owned`): every
        mark they hold is taken as a person's and kept until removed, except the names the program
        makes (before-rewind-N, the demo's demo-N-M-files), which follow retention. Keeping too
        much is the safe side: a person can remove a mark, never bring a faded one back."""
        if self.meta.get("marks_owned"):
            return
        names = [m.name for m in self._db.marks() if not AUTO_MARK.fullmatch(m.name)]
        pins = sorted(set(self.meta.get("pinned", [])) | set(names))
        with self._wdb.write():
            self._wdb.db.executemany("UPDATE marks SET pinned=1 WHERE name=?", [(n,) for n in pins])
        self.meta["pinned"] = pins
        self.meta["marks_owned"] = 1
        self.save_meta()
        if names:
            self.recovery.append(f"{len(names)} mark(s) from before marks were kept until removed are now kept"
                                 " until removed (`rewind mark DIR NAME --remove` removes one)")

    def _undo_torn(self, ranges: list[tuple[int, int]]) -> None:
        """The primary may hold writes whose journal records were torn: put back the journaled state."""
        self._build_state()
        bs = self.block_size
        for b0, count in ranges:
            b0, count = max(0, b0), min(count, self.nblocks - max(0, b0))
            if count > 0:
                self._primary.pwrite(b0 * bs, self._read(self._head, b0 * bs, count * bs, indexed=True))
        self._primary.sync()
        self.recovery.append(f"restored {len(ranges)} primary ranges written by torn, unacknowledged records")

    def _reapply_retention(self, release: bool) -> None:
        """After a rebuild (or a fade cut short), points that retention had merged away stay
        merged away; after a rebuild, blocks it had released are released again (their old
        versions may survive in segments that were kept for other data)."""
        db = self._wdb
        hz, until = self.horizon, int(self.meta.get("kept_until", 0))
        if release and hz > 0:
            with db.write():
                db.db.execute(
                    "DELETE FROM versions WHERE block IN"
                    " (SELECT block FROM versions GROUP BY block HAVING max(seq) <= ?)",
                    (hz,),
                )
        kept = set(self.meta.get("kept", [])) | {hz}
        with db.write():
            db.db.executemany("UPDATE marks SET pinned=1 WHERE name=?", [(n,) for n in self.meta.get("pinned", [])])
            gone = [
                int(s)
                for (s,) in db.db.execute("SELECT seq FROM records WHERE seq>=? AND seq<=?", (hz, until))
                if s not in kept
            ]
            db.drop_points(gone, hz)

    def _build_state(self) -> None:
        """The copy-on-first-write bitmap: which blocks still need a baseline before an overwrite."""
        bs = self.block_size
        st = bytearray(self.nblocks)
        watch = self.meta.get("mode") == "watch"
        if not watch:
            for a, e in self._primary.holes():
                b0, b1 = -(-a // bs), e // bs
                if b1 > b0:
                    st[b0:b1] = bytes([HOLE]) * (b1 - b0)
        # last[b] is the seq of b's newest version: a past point at or after it reads b from the
        # primary, like the live volume (a watched primary may hold changes not journaled yet)
        last = array("I", bytes(4 * self.nblocks)) if not watch and self.nblocks <= LAST_MAX_BLOCKS else None
        for b, s in self._db.touched_blocks():
            if 0 <= b < self.nblocks:
                st[b] = TOUCHED
                if last is not None:
                    last[b] = max(last[b], min(s, LAST_NONE))
        if last is not None:
            for gen in (*self._frozen, self._gen):  # recovered rows not yet committed
                for b, s, _loc, _crc in gen.versions:
                    if 0 <= b < self.nblocks:
                        last[b] = max(last[b], min(s, LAST_NONE))
        self._state = st
        self._last = last

    # index generations -------------------------------------------------------------------
    def _add_record(self, gen: _Gen, seq: int, t: int, kind: int, block: int, count: int) -> None:
        """Hot path: a records row and the map it belongs to; aggregates are made at commit."""
        if self._mark_pending_roll or t - self._map_first[1] >= MAP_SPAN_NS or self._map_id == 0:
            self._map_id += 1
            self._map_first = (seq, t)
            self._mark_pending_roll = False
        gen.records.append((seq, t, int(kind), block, count, self._map_id))
        if kind == K_MARK:
            self._mark_pending_roll = True

    def _commit(self, gen: _Gen, redo_from: tuple[int, int] | None = None) -> None:
        """Write one generation to SQLite (indexer thread, or recovery). Safe to retry.
        `redo_from`: the primary is durable up to there (a checkpoint); recovery starts there."""
        meta: dict[str, Any] = {
            "map_id": self._map_id,
            "map_first_seq": self._map_first[0],
            "map_first_time": self._map_first[1],
        }
        if gen.last_seq and gen.end_pos[0] > self._segno_hwm:
            # the newest segment the index points into (synced: a newer one may not be durable yet);
            # segment numbers up to it are never used again
            self._segno_hwm = meta["segno_hwm"] = gen.end_pos[0]
        if gen.last_seq:
            meta["indexed_seq"] = gen.last_seq
            meta["indexed_time"] = self._last_time
            meta["indexed_segno"], meta["indexed_off"] = gen.end_pos
        if redo_from is not None:
            meta["redo_segno"], meta["redo_off"] = redo_from
            self._redo_pos = redo_from
        try:
            self._wdb.commit(gen.versions, gen.records, gen.marks, gen.unmarks, meta, self.block_size, self.space_used())
        except apsw.FullError:
            raise NoSpace(f"no space left for the index {self.dir / 'maps.db'}: free space on that disk") from None

    def _index_once(self) -> bool:
        """Commit the oldest pending generation. One that failed stays pending and goes first."""
        with self._lock:
            pending = self._frozen[0].last_seq if self._frozen else self._gen.last_seq
        watch = self.meta.get("mode") == "watch"
        if watch:
            self._applier.wait(pending)  # the slow part, before taking the commit lock others need
        with self._commit_lock:
            with self._lock:
                if self._frozen:
                    gen = self._frozen[0]
                else:
                    gen = self._gen
                    if gen.empty():
                        return False
                    self._gen = _Gen()
                    self._frozen.append(gen)
            # the index may point only at durable journal records; the primary is synced at
            # checkpoints, and recovery redoes onto it everything from the last one on
            self._sync_journal()
            redo_from = None
            if watch:  # a redo would overwrite changes made to the file since: checkpoint each commit
                self._applier.wait(gen.last_seq)
                self._primary.sync()
                redo_from = gen.end_pos
            self._commit(gen, redo_from)
            with self._lock:
                self._frozen.remove(gen)
                self._indexed_seq = max(self._indexed_seq, gen.last_seq)
                self._indexed_pos = max(self._indexed_pos, gen.end_pos)
            if redo_from is not None:
                self._checkpointed()
            elif self._checkpoint_due():
                self._ckpt_wake.set()
            return True

    def _checkpoint_due(self) -> bool:
        """Time for a checkpoint (watched primaries have one at every commit)?"""
        return (
            time.monotonic() - self._checkpoint_t >= CHECKPOINT_S
            or self.journal.total_bytes - self._checkpoint_bytes >= CHECKPOINT_BYTES
        )

    def _checkpointed(self) -> None:
        self._checkpoint_t = time.monotonic()
        self._checkpoint_bytes = self.journal.total_bytes

    def checkpoint(self) -> None:
        """Make the primary durable up to the index, so recovery redoes nothing before it (close,
        and a fade before it rewrites or deletes segments a redo might read)."""
        with self._commit_lock:  # the index stays where it is until the redo start is there
            self._checkpoint_now()

    def _checkpoint_now(self) -> None:
        """Drain the applier up to the index, make the primary durable, move the redo start there."""
        with self._lock:
            seq, pos = self._indexed_seq, self._indexed_pos
        self._applier.wait(seq)
        # a write before `pos` may have been skipped for a later one to the same blocks
        # (absorption): that later record must be durable before the redo start passes the
        # skipped one, or a power cut could lose both
        self._sync_journal()
        self._primary.sync()
        with self._commit_lock:
            if self._redo_pos is None or pos > self._redo_pos:
                self._set_redo_start(pos)
        self._checkpointed()

    def _checkpoint_loop(self) -> None:
        """Checkpoints in their own thread: draining the applier and syncing the primary take
        seconds under heavy writes, and the indexer must go on committing meanwhile (writers wait
        for it once a million rows are pending)."""
        while not self._stop.is_set():
            self._ckpt_wake.wait()
            self._ckpt_wake.clear()
            if self._stop.is_set():
                return
            if not self._checkpoint_due():  # a wake-up from a commit while the last one ran
                continue
            try:
                self._checkpoint_now()
            except Exception as e:  # never die silently: tell the console; the next one retries
                self._emit("error", {"message": f"checkpoint failed: {e}"})
                time.sleep(1)

    def _set_redo_start(self, pos: tuple[int, int]) -> None:
        if pos == self._redo_pos:
            return  # nothing new: a store opened and closed unchanged stays byte for byte the same
        try:
            with self._wdb.write():
                self._wdb.set_meta("redo_segno", pos[0])
                self._wdb.set_meta("redo_off", pos[1])
        except apsw.FullError:
            raise NoSpace(f"no space left for the index {self.dir / 'maps.db'}: free space on that disk") from None
        self._redo_pos = pos

    def _index_sync(self, reading: bool = False) -> None:
        """Commit every row pending now (marks, verify and close need the index complete).
        Rows that arrive meanwhile are left to the indexer: under steady writes this returns.
        `reading`: a read-only caller (log, verify, a diff) goes on with the index as it is when
        the disk is full, rather than fail: the rows stay pending and are committed later."""
        with self._lock:
            target = self._head
        try:
            while self._indexed_seq < target and self._index_once():
                pass
        except NoSpace:
            if not reading:
                raise

    def _index_due(self) -> bool:
        """Commit in big transactions: each one rewrites every b-tree page it touches, so a few
        thousand random rows cost nearly as much as a hundred thousand. Small trickles wait."""
        with self._lock:
            g = self._gen
            if self._frozen or len(g.versions) >= min(INDEX_COMMIT_ROWS, INDEX_MAX_PENDING // 2) or g.marks or g.unmarks:
                return True
            return not g.empty() and time.monotonic() - g.born >= INDEX_MAX_AGE_S

    def _index_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.25)
            self._wake.clear()
            try:
                if self._index_due():
                    self._index_once()
                if self._dirty and time.monotonic() - self._last_sync >= SYNC_INTERVAL_S and not self._closed:
                    self.flush()
            except Exception as e:  # never die silently: tell the console
                self._emit("error", {"message": f"indexing failed: {e}"})
                time.sleep(1)

    # write path --------------------------------------------------------------------------
    def _next(self) -> tuple[int, int]:
        self._head += 1
        t = self.clock()
        if t < self._last_time:
            t = self._last_time  # times never go backwards, even if the wall clock does
        self._last_time = t
        return self._head, t

    def _check_range(self, off: int, n: int) -> None:
        if off < 0 or n < 0 or off + n > self.size:
            raise BadInput(f"range {off}+{n} is outside the volume (size {self.size})")

    def _write_many(self, reqs: list[Req], fua: bool) -> None:
        try:
            self._write_many_locked(reqs, fua)
        except BadInput:
            raise
        except Exception as e:  # a write that fails must never fail silently: tell the consoles
            self._emit("write-failed", {"message": str(e), "kind": type(e).__name__})
            raise

    @contextlib.contextmanager
    def _turn(self, commit: bool = False) -> Iterator[None]:
        """Take the store lock (after the commit lock, if asked) with priority over the writer.

        Python locks are not fair: a writer in a loop takes the lock again at once, and a fade,
        an export or a preview waiting for it could starve. Writers step aside while anyone waits
        here."""
        with self._lock_counter:
            self._waiting += 1
        acquired = False
        try:
            with self._commit_lock if commit else contextlib.nullcontext(), self._lock:
                with self._lock_counter:
                    self._waiting -= 1
                acquired = True
                yield
        finally:
            if not acquired:
                with self._lock_counter:
                    self._waiting -= 1

    def _write_many_locked(self, reqs: list[Req], fua: bool) -> None:
        bs = self.block_size
        while self._waiting:  # let a fade, an export or a preview have its turn
            time.sleep(0.0002)
        if self._pending_rows() > INDEX_MAX_PENDING:
            self._wait_for_indexer()
        high = self._space_high
        if high is not None and self.journal.total_bytes >= high:
            self._wait_for_space()
        self._applier.check_room()  # the primary's disk is full: refused, not acknowledged
        with self._lock:
            if self._closed:
                raise RewindError("the store is closed")
            if self._refuse_full and self.over_limit():
                raise NoSpace(
                    f"the journal reached its space limit ({self.retention()['max_size']} bytes) and the policy"
                    " says refuse: fade history (`rewind fade`) or raise --max-size"
                )
            for kind, off, x in reqs:  # check everything before anything is staged
                if kind not in ("write", "zero", "trim"):
                    raise BadInput(f"unknown request kind {kind!r}")
                self._check_range(off, len(x) if kind == "write" else int(x))
            batch = _Batch()
            # the common request, one aligned block of a block already journaled (or a hole), is
            # staged right here (_stage_write, _stage_baselines and _Batch.add in one), with one
            # clock reading for the batch (its requests arrived together; the general path's
            # _next may move _last_time on, and times never go backwards)
            st, undo, pieces, recs, prim = self._state, batch.undo, batch.pieces, batch.recs, batch.prim
            self._last_time = max(self.clock(), self._last_time)
            step = HEADER_SIZE + 4 + bs
            for kind, off, x in reqs:
                if kind == "write":
                    data = x if isinstance(x, memoryview) else memoryview(x)
                    n = len(data)
                    if n == bs and not off % bs:
                        b = off // bs
                        s = st[b]
                        if s != UNTOUCHED:
                            if s == HOLE:  # a hole's horizon contents are zeros: no baseline
                                undo.append((b, _HOLE_BYTE))
                                st[b] = TOUCHED
                            self._head = seq = self._head + 1
                            t = self._last_time
                            head, crc = encode_one_block(K_WRITE, seq, t, b, 0, data)
                            pieces += (head, data)
                            prim.append((len(recs), off, bs, data))
                            recs.append((K_WRITE, seq, t, b, 1, batch.nbytes, crc, 0))
                            batch.nbytes += step
                            continue
                    if n == 0:
                        continue
                    if off % bs or n % bs:
                        self._write_unaligned(batch, off, data)
                    else:
                        self._stage_write(batch, off // bs, data)
                    continue
                n = int(x)
                a, e = -(-off // bs) * bs, (off + n) // bs * bs
                if a >= e:  # no whole block inside: zero the part
                    if n:
                        self._write_unaligned(batch, off, bytes(n))
                    continue
                if off < a:
                    self._write_unaligned(batch, off, bytes(a - off))
                self._stage_zero(batch, a // bs, (e - a) // bs)
                if e < off + n:
                    self._write_unaligned(batch, e, bytes(off + n - e))
            if batch.undo:
                self._reserve_holes(batch)
            self._apply(batch)
        if fua:
            self.flush()
        self._wake_indexer()

    def _wait_for_indexer(self) -> None:
        """Back-pressure: a writer faster than the indexer waits for it (for a while), so the rows
        held in memory, and the journal tail an open would have to redo, stay bounded."""
        self._wake.set()
        deadline = time.monotonic() + 10.0  # an index that cannot commit (full disk) must not hang writes
        # down to 90 %, one commit or so: waiting for half (as before) stalled a writer for seconds
        while self._pending_rows() > INDEX_MAX_PENDING * 9 // 10 and time.monotonic() < deadline and not self._closed:
            time.sleep(0.005)

    def _wait_for_space(self) -> None:
        """Space limit, policy fade, retention running: near the limit, start a fade at once;
        past it, wait for the fade to make room (as `refuse` would fail, but waiting)."""
        self._space_wake.set()
        limit = (self.meta.get("retention") or {}).get("max_size")
        if not limit:
            return
        deadline = time.monotonic() + SPACE_WAIT_S
        while self.journal.total_bytes > limit and not self._closed and self._space_high is not None:
            if self._space_held_at is not None and self._space_held_at == self.horizon:
                return  # a person's mark holds the history: over the limit rather than refusing writes
            if time.monotonic() > deadline:
                raise NoSpace(
                    f"the journal is at its space limit ({limit} bytes) and fading history has not made room"
                    f" within {SPACE_WAIT_S:g} s (see the console's errors): raise --max-size or unpin marks"
                )
            self._space_wake.set()
            time.sleep(0.005)

    def _pending_rows(self) -> int:
        """Version rows journaled but not yet committed to the index."""
        return len(self._gen.versions) + sum(len(g.versions) for g in self._frozen)

    def _write_unaligned(self, batch: _Batch, off: int, data: bytes | memoryview) -> None:
        """Read-modify-write the whole blocks around `data`, within the same batch: the blocks'
        current contents are the live volume overlaid with what this batch already staged, so a
        request is never split over two journal appends."""
        bs = self.block_size
        a, e = off - off % bs, -(-(off + len(data)) // bs) * bs
        buf = bytearray(view.read_live(self, a, e - a))
        for _idx, poff, n, staged in batch.prim:
            lo, hi = max(poff, a), min(poff + n, e)
            if lo < hi:
                buf[lo - a : hi - a] = bytes(hi - lo) if staged is None else staged[lo - poff : hi - poff]
        buf[off - a : off - a + len(data)] = data
        self._stage_write(batch, a // bs, memoryview(buf))

    def _stage_baselines(self, batch: _Batch, b0: int, count: int, old: memoryview | None = None) -> None:
        """Copy-on-first-write: journal the horizon contents of blocks about to change."""
        st = self._state
        if count == 1:
            s0 = st[b0]
            if s0 == TOUCHED:
                return
            if s0 == HOLE and old is None:  # a hole's horizon contents are zeros: nothing to keep
                batch.undo.append((b0, _HOLE_BYTE))
                st[b0] = TOUCHED
                return
        bs = self.block_size
        seg = st[b0 : b0 + count]
        if UNTOUCHED not in seg and HOLE not in seg:
            return
        horizon = int(self.meta["horizon_seq"])
        i = 0
        while i < count:
            s = seg[i]
            if s == TOUCHED or (s == HOLE and old is None):
                i += 1
                continue
            j = i + 1
            limit = WRITE_RECORD_BYTES // bs
            while j < count and j - i < limit and (seg[j] == UNTOUCHED or (seg[j] == HOLE and old is not None)):
                j += 1
            if old is None:
                data = memoryview(self._primary.pread((b0 + i) * bs, (j - i) * bs))
            else:
                data = old[i * bs : j * bs]
            seq, t = self._next()
            batch.add(K_BASELINE, seq, t, b0 + i, j - i, data, aux=horizon, bs=bs)
            i = j
        batch.undo.append((b0, bytes(seg)))
        st[b0 : b0 + count] = bytes([TOUCHED]) * count

    def _stage_write(self, batch: _Batch, b0: int, data: memoryview, primary: bool = True) -> None:
        bs = self.block_size
        count = len(data) // bs
        self._stage_baselines(batch, b0, count)
        if count == 1:
            seq, t = self._next()
            batch.add(K_WRITE, seq, t, b0, 1, data, bs=bs)
            if primary:
                batch.prim.append((len(batch.recs) - 1, b0 * bs, bs, data))
            return
        step = WRITE_RECORD_BYTES // bs
        for i in range(0, count, step):
            k = min(step, count - i)
            seq, t = self._next()
            batch.add(K_WRITE, seq, t, b0 + i, k, data[i * bs : (i + k) * bs], bs=bs)
            if primary:
                batch.prim.append((len(batch.recs) - 1, (b0 + i) * bs, k * bs, data[i * bs : (i + k) * bs]))

    def _stage_zero(self, batch: _Batch, b0: int, count: int) -> None:
        seg = self._state[b0 : b0 + count]
        if UNTOUCHED not in seg and TOUCHED not in seg:
            return  # zeros over untouched holes change nothing: no history, no I/O
        self._stage_baselines(batch, b0, count)
        seq, t = self._next()
        batch.add(K_ZERO, seq, t, b0, count, None, bs=self.block_size)
        batch.prim.append((-1, b0 * self.block_size, count * self.block_size, None))

    def _reserve_holes(self, batch: _Batch) -> None:
        """Allocate on the primary the holes this batch writes into, before the write is
        journaled and acknowledged: the applier writes them later, and a full disk met then
        could only be reported after the fact (and the freed space would go to that backlog)."""
        bs = self.block_size
        holes: list[tuple[int, int]] = []  # [start, end) block runs that were holes
        for b0, old in batch.undo:
            i = old.find(HOLE)
            while i >= 0:
                j = i + 1
                while j < len(old) and old[j] == HOLE:
                    j += 1
                holes.append((b0 + i, b0 + j))
                i = old.find(HOLE, j)
        if not holes:
            return
        try:
            for idx, poff, n, _data in batch.prim:
                if idx < 0:
                    continue  # zeros need no room
                w0, w1 = poff // bs, -(-(poff + n) // bs)
                for h0, h1 in holes:
                    lo, hi = max(w0, h0), min(w1, h1)
                    if lo < hi:
                        self._primary.reserve(lo * bs, (hi - lo) * bs)
        except BaseException:
            self._unstage(batch)
            raise

    def _unstage(self, batch: _Batch) -> None:
        """Nothing of the batch reached the journal: forget its seqs and bitmap changes."""
        if batch.recs:
            self._head = batch.recs[0][1] - 1
        for b0, old in reversed(batch.undo):
            self._state[b0 : b0 + len(old)] = old
        batch.clear()

    def _apply(self, batch: _Batch) -> None:
        """Append the staged records in one go, then write the primary, then index."""
        if not batch.recs:
            return
        try:
            segno, start = self.journal.append(batch.pieces, batch.nbytes)
        except BaseException:
            self._unstage(batch)
            raise
        self._dirty = True
        bs = self.block_size
        gen = self._gen
        base = make_loc(segno, start + HEADER_SIZE)
        versions = gen.versions
        vappend = versions.append
        rappend = gen.records.append
        last = self._last
        # records of the current delta map go straight in; a map roll (or a mark) takes the
        # general path through _add_record
        fast_map = not self._mark_pending_roll and self._map_id != 0
        map_id, map_t0 = self._map_id, self._map_first[1]
        # while the generation's per-block lookup is complete, one-block writes keep it so (a
        # past read then never has to index a million pending rows first); other rows are left
        # to the lazy build in _Gen.lookup
        blocks = gen.blocks if gen.nindexed == len(versions) else None
        for kind, seq, t, b0, count, rel, crcs, aux in batch.recs:
            if kind == K_WRITE and count == 1:
                if last is not None:
                    last[b0] = seq if seq < LAST_NONE else LAST_NONE
                loc = base + rel + 4
                vappend((b0, seq, loc, crcs))  # one block: its crc
                if blocks is not None:
                    lst = blocks.get(b0)
                    if lst is None:
                        blocks[b0] = [(seq, loc, crcs)]
                    else:
                        lst.append((seq, loc, crcs))
                if fast_map and t - map_t0 < MAP_SPAN_NS:
                    rappend((seq, t, K_WRITE, b0, 1, map_id))
                else:
                    self._add_record(gen, seq, t, kind, b0, 1)
                    fast_map = not self._mark_pending_roll
                    map_id, map_t0 = self._map_id, self._map_first[1]
                continue
            if blocks is not None:
                gen.nindexed = len(versions)
                blocks = None
            if last is not None and kind != K_BASELINE and kind != K_MARK and kind != K_UNMARK:
                s32 = seq if seq < LAST_NONE else LAST_NONE
                if count == 1:
                    last[b0] = s32
                else:
                    last[b0 : b0 + count] = array("I", (s32,)) * count
            if kind == K_ZERO:
                zl = zero_loc(segno, start + rel)
                versions.extend(zip(range(b0, b0 + count), repeat(seq), repeat(zl), repeat(0)))
            elif kind == K_MARK or kind == K_UNMARK:
                pass
            elif count == 1:
                versions.append((b0, aux if kind == K_BASELINE else seq, base + rel + 4, crcs))
            else:
                loc0 = base + rel + 4 * count
                key = aux if kind == K_BASELINE else seq
                versions.extend(zip(range(b0, b0 + count), repeat(key), range(loc0, loc0 + count * bs, bs), crcs))
            if kind != K_BASELINE:
                self._add_record(gen, seq, t, kind, b0, count)
                fast_map = not self._mark_pending_roll
                map_id, map_t0 = self._map_id, self._map_first[1]
        if blocks is not None:
            gen.nindexed = len(versions)
        gen.last_seq = batch.recs[-1][1]
        gen.end_pos = (segno, start + batch.nbytes)
        if batch.prim:
            ops: list[Op] = []
            oappend = ops.append
            nbytes = 0
            recs = batch.recs
            w, z = applier.WRITE, applier.ZERO
            for idx, poff, n, _data in batch.prim:
                if idx < 0:
                    oappend((z, 0, 0, poff, n, 0))
                else:
                    r = recs[idx]
                    oappend((w, segno, start + r[5] + HEADER_SIZE + 4 * r[4], poff, n, r[1]))
                    nbytes += n
            self._applier.submit(gen.last_seq, ops, nbytes)
        batch.clear()
        if len(gen.versions) >= INDEX_BATCH_ROWS:
            self._wake.set()

    def _wake_indexer(self) -> None:
        if len(self._gen.versions) >= INDEX_COMMIT_ROWS:
            self._wake.set()

    def journal_external(self, off: int, data: bytes, old: bytes) -> None:
        """Watch mode: journal a write another program already made to the primary."""
        self.journal_external_many([(off, data, old)])

    def journal_external_many(self, items: list[tuple[int, bytes, bytes]]) -> None:
        """Watch mode: journal many external writes (new and old contents) with one append."""
        bs = self.block_size
        for off, data, old in items:
            if off % bs or len(data) % bs or len(old) != len(data):
                raise BadInput("external writes must be whole blocks with their old contents")
            self._check_range(off, len(data))
        with self._lock:
            batch = _Batch()
            for off, data, old in items:
                b0, count = off // bs, len(data) // bs
                self._stage_baselines(batch, b0, count, old=memoryview(old))
                self._stage_write(batch, b0, memoryview(data), primary=False)
            self._apply(batch)
        self._wake_indexer()

    def set_mode(self, mode: str) -> None:
        """"mirror" (writes come through Rewind) or "watch" (Rewind follows a file others write)."""
        if mode not in ("mirror", "watch"):
            raise BadInput(f"unknown mode {mode!r}")
        with self._lock:
            self._applier.wait(self._head)  # absorption reads the last-write array being rebuilt
            self.meta["mode"] = mode
            _write_json(self.dir / "store.json", self.meta)
            self._build_state()
            self._applier.last = self._last

    def flush(self, primary: bool = False) -> None:
        """Make every write so far durable (NBD FLUSH, FUA, fsync): the journal makes it so.

        Like a database's log: recovery redoes onto the primary every record past the last checkpoint,
        and the primary is synced at checkpoints (see _checkpoint_due), so a FLUSH
        writes the data to disk once, not twice. `primary=True` syncs the primary too (close,
        rewind: the image must be whole on its own afterwards).

        Group commit: the fsyncs run outside the store's lock, so writers go on meanwhile, and one
        flush covers every write that came before it.
        """
        head = self._sync_journal()
        if primary:
            self._applier.wait(head)
            self._primary.sync()
        else:
            self._applier.check()  # a failed primary write is reported, never hidden behind a good flush
        self._last_sync = time.monotonic()

    def _sync_journal(self) -> int:
        """Sync every journal segment written so far; returns the head it covers."""
        with self._lock:
            head = self._head
            fds, new_name = self.journal.take_dirty()
            self._dirty = False
        self.journal.sync_fds(fds, new_name)
        return head

    # read path ---------------------------------------------------------------------------
    def _version(self, block: int, seq: int) -> Version | None:
        return view.version_at(self, block, seq)

    def forget(self) -> None:
        """Versions were deleted or moved (fade): drop cached lookups. Call under the store lock."""
        self._vcache = {}
        self._warmed = set()

    def warm(self, seq: int) -> None:
        """Look up in the background the versions at `seq` of the blocks written since, so that
        a front end serving the point (a past export) does not pay an index query per block."""
        with self._lock:
            busy = self._warmer is not None and self._warmer.is_alive()
            if self._closed or self._last is None or seq in self._warmed or busy:
                return  # one at a time: each scans the last-write array and has a connection
            self._warmed.add(seq)
            self._warmer = threading.Thread(target=view.warm, args=(self, seq), name="rewind-warm", daemon=True)
            self._warmer.start()

    def _read(self, seq: int | None, off: int, n: int, indexed: bool = False) -> bytes:
        return view.read_at(self, seq, off, n, indexed)

    def at(self, point: str | int) -> Volume:
        """A read-only view of the volume at a point in time."""
        return Volume(self, self.resolve(point))

    # points ------------------------------------------------------------------------------
    @property
    def head(self) -> int:
        return self._head

    @property
    def horizon(self) -> int:
        return int(self.meta["horizon_seq"])

    def resolve(self, point: str | int) -> int:
        """POINT -> record sequence number, or PointError saying what is addressable."""
        now = self.clock()
        p = parse_point(point, now)
        with self._lock:
            hz, head = self.horizon, self._head
            if p.kind == "now":
                return head
            if p.kind == "mark":
                m = self._find_mark(p.name)
                if m is None:
                    names = ", ".join(x.name for x in self.marks()[-5:]) or "none yet"
                    raise PointError(f"no mark named {p.name!r} (marks: {names}); see `rewind log`")
                return m.seq
            if p.kind == "seq":
                if p.value < hz or p.value > head:
                    raise PointError(f"seq:{p.value} is outside the history (seq:{hz} to seq:{head})")
                return self._addressable(p.value, str(point))
            t = p.value
            if t < int(self.meta["horizon_ns"]):
                raise PointError(
                    f"{point} is before the horizon ({format_ns(int(self.meta['horizon_ns']))}): nothing older is kept"
                )
            if t >= self._last_time:
                # Between the newest write and now the volume held the newest state; a time past
                # the clock (beyond a little skew) names a state that does not exist yet.
                if t > max(now, self._last_time) + FUTURE_SKEW_NS:
                    raise PointError(
                        f"{point} is in the future (it is {format_ns(now)}): the newest point is seq:{head} "
                        f"({format_ns(self._last_time)}); use now for the present"
                    )
                return head
            for gen in (self._gen, *reversed(self._frozen)):
                i = bisect.bisect_right(gen.records, t, key=lambda r: r[1])
                if i:
                    return gen.records[i - 1][0]
            s = self._db.seq_at_time(t)
            return self._addressable(hz if s is None else max(hz, s), str(point))

    def _addressable(self, seq: int, label: str) -> int:
        """Retention merged some points away: refuse them, naming the nearest kept points."""
        until = int(self.meta.get("kept_until", 0))
        if seq > until or seq == self.horizon:
            return seq
        kept = sorted(set(self.meta.get("kept", [])) | {self.horizon})
        i = bisect.bisect_left(kept, seq)
        if i < len(kept) and kept[i] == seq:
            return seq
        before = kept[i - 1] if i > 0 else None
        after = kept[i] if i < len(kept) else self._db.kept_neighbours(until)[1]
        near = " and ".join(
            f"seq:{x} ({format_ns(self.point_time(x))})" for x in (before, after) if x is not None
        )
        raise PointError(f"{label} was merged away by retention; the nearest kept points are {near}")

    def point_time(self, seq: int) -> int:
        with self._lock:
            for gen in (self._gen, *reversed(self._frozen)):
                i = bisect.bisect_right(gen.records, seq, key=lambda r: r[0])
                if i:
                    return gen.records[i - 1][1]
            t = self._db.record_time(seq)
            return int(self.meta["horizon_ns"]) if t is None else t

    def _find_mark(self, name: str) -> Mark | None:
        for gen in (self._gen, *reversed(self._frozen)):
            if name in gen.unmarks:
                return None
            for m in reversed(gen.marks):
                if m[0] == name:
                    return Mark(m[0], m[1], m[2], bool(m[3]))
        return self._db.mark(name)

    def mark(self, name: str, pinned: bool = False, at: str | int | None = None) -> Mark:
        """Name the present point, or the point `at` (a POINT or a seq). `pinned`: kept until
        removed (a person's mark); otherwise it follows retention (the program's marks: before-
        rewind-N, the demo's). Durable when this returns."""
        check_mark_name(name)
        target = None if at is None else self.resolve(at)
        with self._turn():
            if self._find_mark(name) is not None:
                raise BadInput(f"a mark named {name!r} exists: pick another name, or remove it first")
            raw = name.encode()
            seq, t = self._next()
            batch = _Batch()
            if target is not None and target < seq:
                # the MARK record names an earlier point: aux = its seq, block = its time
                mseq, mt = target, self.point_time(target)
                batch.add(K_MARK, seq, t, mt, 0, memoryview(raw), bs=self.block_size, aux=mseq)
            else:
                mseq, mt = seq, t
                batch.add(K_MARK, seq, t, 0, 0, memoryview(raw), bs=self.block_size)
            self._apply(batch)
            self._gen.add_mark(name, mseq, mt, int(pinned))
            pins = set(self.meta.get("pinned", []))
            if pinned or name in pins:
                (pins.add if pinned else pins.discard)(name)
                self.meta["pinned"] = sorted(pins)
                self.save_meta()
        self.flush()
        self._index_sync()
        m = Mark(name, mseq, mt, pinned)
        self._emit("mark", {"name": name, "seq": mseq, "time_ns": mt, "pinned": pinned})
        return m

    def unmark(self, name: str) -> Mark:
        """Remove a mark (its point stays while retention keeps it). Journaled, durable on return."""
        with self._turn():
            m = self._find_mark(name)
            if m is None:
                names = ", ".join(x.name for x in self.marks()[-5:]) or "none yet"
                raise BadInput(f"no mark named {name!r} (marks: {names}); see `rewind log`")
            seq, t = self._next()
            batch = _Batch()
            batch.add(K_UNMARK, seq, t, 0, 0, memoryview(name.encode()), bs=self.block_size)
            self._apply(batch)
            self._gen.drop_mark(name)
            if name in self.meta.get("pinned", []):
                self.meta["pinned"] = sorted(set(self.meta["pinned"]) - {name})
                self.save_meta()
        self.flush()
        self._index_sync()
        self._emit("unmark", {"name": name, "seq": m.seq})
        return m

    def points(self, since_seq: int | None = None) -> list[tuple[int, int]]:
        """Addressable points (seq, time ns) in order: the horizon, then every kept record
        (or those after `since_seq`)."""
        self._index_sync(reading=True)
        with self._lock:
            out: list[tuple[int, int]] = []
            if since_seq is None:
                out.append((self.horizon, int(self.meta["horizon_ns"])))
                since_seq = self.horizon
            out += self._db.points(since_seq)
            return out

    def pin(self, name: str, pinned: bool = True) -> Mark:
        """Pin a mark (kept whatever retention says) or unpin it."""
        m = self._find_mark(name)
        if m is None:
            raise BadInput(f"no mark named {name!r}: see `rewind log`")
        self._index_sync()
        with self._lock:
            self._wdb.db.execute("UPDATE marks SET pinned=? WHERE name=?", (int(pinned), name))
            pins = set(self.meta.get("pinned", []))
            (pins.add if pinned else pins.discard)(name)
            self.meta["pinned"] = sorted(pins)
            self.save_meta()
        return Mark(m.name, m.seq, m.time_ns, pinned)

    def marks(self) -> list[Mark]:
        self._index_sync(reading=True)
        with self._lock:
            return self._db.marks()

    def maps(self) -> list[MapInfo]:
        self._index_sync(reading=True)
        with self._lock:
            return self._db.maps()

    def stats(self, since_ns: int | None = None, until_ns: int | None = None) -> list[StatRow]:
        """Per-second write counts and journal size (kept on disk, so the whole history)."""
        self._index_sync(reading=True)
        with self._lock:
            rows = self._db.stats(
                None if since_ns is None else since_ns // 10**9, None if until_ns is None else until_ns // 10**9
            )
        return [StatRow(*r) for r in rows]

    def info(self) -> dict[str, Any]:
        """What `rewind log` shows, JSON-able."""
        self._index_sync(reading=True)
        with self._lock:
            db = self._db
            jb = self.journal.size_bytes()
            mb = sum(
                os.path.getsize(p) for p in (self.dir / "maps.db", self.dir / "maps.db-wal") if p.exists()
            )
            return {
                "store": str(self.dir),
                "primary": self.primary_path,
                "size": self.size,
                "block_size": self.block_size,
                "mode": self.meta.get("mode", "mirror"),
                "records": db.count("records"),
                "versions": db.count("versions"),
                "journal_bytes": jb,
                "primary_backlog_bytes": self._applier.backlog,  # journaled, not yet on the primary
                "primary_full": self._applier.full is not None,
                "maps_bytes": mb,
                "segments": len(self.journal.segment_numbers()),
                "horizon": {"seq": self.horizon, "time_ns": int(self.meta["horizon_ns"])},
                "head": {"seq": self._head, "time_ns": self._last_time},
                "marks": [{**m.__dict__, "kept": "until removed" if m.pinned else "by retention"}
                          for m in db.marks()],
                "maps": [m.__dict__ for m in db.maps()],
                "recovery": list(self.recovery),
                "damage": list(self.damage),
                "retention": self.retention(),
                "watch": self._watch_info(),
            }

    # diff --------------------------------------------------------------------------------
    def changed_blocks(self, a: str | int, b: str | int) -> list[int]:
        """Blocks whose contents differ between two points, found from the maps (claim 3)."""
        return view.changed_blocks(self, self.resolve(a), self.resolve(b))

    def diff(self, a: str | int, b: str | int) -> list[tuple[int, int]]:
        """(offset, length) byte ranges that differ between two points."""
        bs = self.block_size
        runs: list[tuple[int, int]] = []
        for blk in self.changed_blocks(a, b):
            if runs and runs[-1][0] + runs[-1][1] == blk * bs:
                runs[-1] = (runs[-1][0], runs[-1][1] + bs)
            else:
                runs.append((blk * bs, bs))
        return runs

    # jobs --------------------------------------------------------------------------------
    def export(self, point: str | int, out: str | Path) -> Job:
        """Job: write OUT, a sparse raw image equal to the volume at POINT (claim 5)."""
        from .jobs.export import export_job

        return export_job(self, self.resolve(point), out)

    def rewind(self, point: str | int) -> Job:
        """Job: make the primary equal to POINT in place, journaled, after marking the present."""
        from .jobs.rewind import rewind_job

        return rewind_job(self, self.resolve(point))

    def verify(self) -> Job:
        """Job: check every record's checksums and every index entry against the journal."""

        def body(check: Callable[[], None]) -> Generator[Progress, None, Any]:
            from .jobs.verify import verify_store

            result = yield from verify_store(self, check)
            if result:
                self._emit("damage", {"problems": result[:20]})
            return result

        return Job("verify", body)

    # retention -------------------------------------------------------------------------
    def policy(self) -> Policy:
        return Policy.parse(self.retention()["policy"])

    def retention(self) -> dict[str, Any]:
        """The retention settings: tiers, space limit (bytes or None) and what to do when full."""
        r = dict(self.meta.get("retention") or {})
        r.setdefault("policy", DEFAULT_POLICY)
        r.setdefault("max_size", None)
        r.setdefault("on_full", "fade")
        r["faded_early"] = list(self.meta.get("faded_early", []))[-10:]
        return r

    def set_retention(
        self, policy: str | None = None, max_size: int | None = None, on_full: str | None = None
    ) -> dict[str, Any]:
        """Change retention; max_size 0 removes the limit. Checked before anything is saved."""
        r = self.retention()
        r.pop("faded_early", None)
        if policy is not None:
            r["policy"] = str(Policy.parse(policy))
        if max_size is not None:
            if max_size < 0:
                raise BadInput("--max-size must be positive (0 removes the limit)")
            r["max_size"] = max_size or None
        if on_full is not None:
            if on_full not in ("fade", "refuse"):
                raise BadInput("--on-full must be 'fade' (default) or 'refuse'")
            r["on_full"] = on_full
        with self._lock:
            self.meta["retention"] = r
            self.save_meta()
            self._refuse_full = r["on_full"] == "refuse"
            self._set_space_limit()
        self._space_wake.set()
        return self.retention()

    def _set_space_limit(self) -> None:
        """Segment size and fade thresholds for the space limit. A fade starts when the journal
        is two segments short of the limit and frees two more (oldest history first); writers
        wait past the limit. Without a retention thread (no serve) nothing fades on its own."""
        r = self.meta.get("retention") or {}
        limit = r.get("max_size")
        seg = None if not limit else max(MIN_SEGMENT, int(limit) // SPACE_SEGMENTS)
        self.journal.cap = seg
        if not limit or seg is None or r.get("on_full", "fade") != "fade" or not self._retaining:
            self._space_high = None
            return
        seg = min(seg, self.journal.SEGMENT_LIMIT)
        self._space_high = max(int(limit) // 2, int(limit) - 2 * seg)

    def _space_goal(self) -> int:
        """Where a fade started by the space limit brings the journal: two segments below the
        mark that started it, so the next fade is not due at once."""
        limit = int((self.meta.get("retention") or {}).get("max_size") or 0)
        seg = min(self.journal.cap or self.journal.SEGMENT_LIMIT, self.journal.SEGMENT_LIMIT)
        return max(limit // 4, limit - 4 * seg)

    def _space_needed(self) -> bool:
        high = self._space_high
        return high is not None and self.journal.total_bytes >= high

    def _space_held_by_mark(self, seq: int) -> None:
        """An early fade stops at a person's mark (kept until removed): say so once per mark; the
        journal may then grow past its limit, since refusing writes would fail the volume's user."""
        if self._space_held_at == seq:
            return
        self._space_held_at = seq
        with self._lock:
            names = [m.name for m in self._db.marks() if m.seq == seq]
        name = names[0] if names else f"seq:{seq}"
        self._emit("space-held", {"seq": seq, "mark": name, "message": (
            f"history is over its size limit and is kept from your mark '{name}' on: remove that mark"
            " (rewind mark DIR NAME --remove) or raise the limit to let older history go")})

    def space_used(self) -> int:
        """Bytes the journal holds (a running count, exact after each fade)."""
        return self.journal.total_bytes

    def over_limit(self) -> bool:
        limit = (self.meta.get("retention") or {}).get("max_size")
        return limit is not None and limit > 0 and self.space_used() > int(limit)

    def fade(self, throttle: float = 0.0, goal: int | None = None) -> Job:
        """Job: apply retention now; past the space limit (policy "fade") fade early too,
        until the journal is within the limit (or `goal` bytes, when given)."""

        def body(check: Callable[[], None]) -> Generator[Progress, None, Any]:
            from .jobs.fade import fade_body

            result = yield from fade_body(self, check, throttle)
            steps = 0
            while steps < 10_000:
                r = self.retention()  # afresh each step: the limit may be lifted meanwhile
                if not r["max_size"] or r["on_full"] != "fade":
                    break
                target = r["max_size"] if goal is None else min(goal, r["max_size"])
                if self.space_used() <= target:
                    break
                before = self.horizon
                result = yield from fade_body(self, check, throttle, free=self.space_used() - target)
                steps += 1
                self._faded_unnoted += 1
                if time.monotonic() - self._faded_noted_t >= FADED_NOTE_S:
                    result["faded_early"] = self._note_faded_early()
                if self.horizon == before:
                    break
            # a fade asked for says what it did; the background one (a steady writer at the limit
            # fades every few seconds) at most every FADED_NOTE_S: each note reaches the console
            if self._faded_unnoted and (goal is None or time.monotonic() - self._faded_noted_t >= FADED_NOTE_S):
                result["faded_early"] = self._note_faded_early()
            return result

        return Job("fade", body)

    def _note_faded_early(self) -> dict[str, Any]:
        """Record (store.json keeps the last few) and announce early fades since the last note."""
        note = {"time_ns": self.clock(), "horizon": self.horizon, "steps": self._faded_unnoted}
        with self._lock:
            self.meta["faded_early"] = [*self.meta.get("faded_early", [])[-(FADED_EARLY_KEPT - 1):], note]
            self.save_meta()
        self._faded_unnoted = 0
        self._faded_noted_t = time.monotonic()
        self._emit("faded-early", note)
        return note

    def fade_preview(self, policy: str | None = None) -> dict[str, Any]:
        """What fade() would remove now (under `policy`, or the store's own); changes nothing."""
        from .jobs.fade import fade_preview

        return fade_preview(self, policy)

    def start_retention(self, interval_s: float = 60.0, throttle: float = 0.005) -> None:
        """Apply retention in the background (serve does this), gently, every `interval_s`;
        and at once, at full speed, when the journal nears its space limit (writers wake it)."""
        with self._lock:
            self._retaining = True
            self._set_space_limit()

        def loop() -> None:
            due = time.monotonic() + interval_s
            while not self._stop.is_set():
                space = self._space_needed()
                if not space:
                    self._space_wake.wait(min(1.0, max(0.0, due - time.monotonic())))
                    self._space_wake.clear()
                    if self._stop.is_set():
                        return
                    space = self._space_needed()
                    if not space and time.monotonic() < due:
                        continue
                before = self.horizon
                try:
                    self.fade(0.0 if space else throttle, self._space_goal() if space else None).run()
                except Exception as e:
                    self._emit("error", {"message": f"retention failed: {e}"})
                    self._stop.wait(1.0)
                else:
                    if space and self.horizon == before:
                        self._stop.wait(1.0)  # nothing left to fade (pinned marks?): do not spin
                if not space:
                    due = time.monotonic() + interval_s

        threading.Thread(target=loop, name="rewind-retention", daemon=True).start()

    def _watch_info(self) -> dict[str, Any] | None:
        """Watch mode is near-continuous, not a mirror: say so, and how the watcher is doing."""
        if self.meta.get("mode") != "watch":
            return None
        from .frontends.watch import watch_info

        return watch_info(self.dir)

    def save_meta(self) -> None:
        _write_json(self.dir / "store.json", self.meta)

    # events ------------------------------------------------------------------------------
    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, data)
            except Exception:  # a broken listener must not break the engine
                pass


class _Batch:
    """Records staged for one journal append, with their byte position inside it."""

    __slots__ = ("pieces", "nbytes", "recs", "prim", "undo")

    def __init__(self) -> None:
        self.pieces: list[bytes | bytearray | memoryview] = []
        self.nbytes = 0
        # (kind, seq, time, block, count, offset in the append, crcs (one block: its crc), aux)
        self.recs: list[tuple[int, int, int, int, int, int, Any, int]] = []
        # (record index or -1 for zero, primary offset, length, data of the record or None)
        self.prim: list[tuple[int, int, int, memoryview | None]] = []
        self.undo: list[tuple[int, bytes]] = []  # (first block, bitmap bytes before staging)

    def clear(self) -> None:
        self.undo.clear()
        self.pieces.clear()
        self.nbytes = 0
        self.recs.clear()
        self.prim.clear()

    def add(
        self, kind: int, seq: int, t: int, block: int, count: int, data: memoryview | None, *, bs: int, aux: int = 0
    ) -> None:
        rel = self.nbytes
        crcs: list[int] = []
        if count == 1 and (kind == K_WRITE or kind == K_BASELINE):
            assert data is not None
            head, crc = encode_one_block(kind, seq, t, block, aux, data)
            self.pieces += (head, data)
            self.nbytes += len(head) + bs
            self.recs.append((kind, seq, t, block, 1, rel, crc, aux))
            return
        if kind in (K_WRITE, K_BASELINE):
            assert data is not None
            crcs = block_crcs(data, bs)
            table = pack_table(crcs)
            n = len(data)
            head = encode_header(kind, seq, t, block, count, len(table) + n, aux, table) + table
            self.pieces += (head, data)
            self.nbytes += len(head) + n
        elif kind == K_ZERO:
            hdr = encode_header(kind, seq, t, block, count, 0, aux, b"")
            self.pieces.append(hdr)
            self.nbytes += len(hdr)
        else:
            assert data is not None
            raw = bytes(data)
            hdr = encode_header(kind, seq, t, block, count, len(raw), aux, raw)
            self.pieces += (hdr, raw)
            self.nbytes += len(hdr) + len(raw)
        self.recs.append((kind, seq, t, block, count, rel, crcs, aux))


MAPS_DAMAGE = (apsw.NotADBError, apsw.CorruptError, apsw.FormatError, apsw.SQLError, apsw.MismatchError)


def maps_damage_error(d: Path, e: BaseException) -> CorruptionError:
    """A damaged maps.db, named, with the way out: it is an index, rebuilt from the journal."""
    return CorruptionError(
        f"{d / 'maps.db'} is damaged ({type(e).__name__}: {e}): it is an index that can be rebuilt from the"
        f" journal: run `rewind verify {d} --repair` (the damaged file is kept aside as maps.db.damaged-TIME;"
        " marks come back from the journal, pins and retention from store.json; the per-second charts keep"
        " only the history the journal still holds)",
        str(d / "maps.db"),
    )


@contextlib.contextmanager
def _maps_damage(d: Path) -> Iterator[None]:
    try:
        yield
    except MAPS_DAMAGE as e:
        raise maps_damage_error(d, e) from e


def _salvage_meta(path: Path) -> dict[str, int]:
    """What a rebuild cannot learn from the journal, if the damaged index still tells it: where
    recovery's redo starts (after an unclean stop, writes from there on may be missing from the
    primary) and the highest segment number used. Read only; {} when unreadable."""
    keys = ("redo_segno", "redo_off", "segno_hwm", "indexed_segno")
    try:
        conn = apsw.Connection(f"file:{path}?mode=ro", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        try:
            rows = conn.execute(
                f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(keys))})", keys
            ).fetchall()
        finally:
            conn.close()
    except apsw.Error:
        return {}
    got = {str(k): v for k, v in rows if isinstance(v, int) and v >= 0}
    out = {k: got[k] for k in ("redo_segno", "redo_off") if "redo_segno" in got and "redo_off" in got}
    hwm = max(got.get("segno_hwm", 0), got.get("indexed_segno", 0))
    if hwm:
        out["segno_hwm"] = hwm
    return out


def _open_maps(d: Path) -> MapDB:
    with _maps_damage(d):
        return MapDB(d / "maps.db")


def _json_crc(obj: dict[str, Any]) -> str:
    """The checksum store.json carries: crc32c of its other fields in a canonical form."""
    body = json.dumps({k: v for k, v in obj.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return f"crc32c:{crc32c(body.encode()):08x}"


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write store.json atomically, sealed with a checksum (see _read_json)."""
    tmp = path.with_suffix(".tmp")
    sealed = {k: v for k, v in obj.items() if k != "checksum"}
    sealed["checksum"] = _json_crc(sealed)
    with open(open_private(tmp), "w") as f:
        json.dump(sealed, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _read_json(path: Path) -> tuple[dict[str, Any], str]:
    """store.json and the state of its checksum: "ok", "missing" (written by an older Rewind, or
    removed by hand to accept an edit: the fields are checked against the journal and maps.db
    before it is sealed again) or "bad" (changed outside Rewind, or damaged)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptionError(f"{path} is unreadable ({e}): the store's description is damaged", str(path)) from e
    if not isinstance(obj, dict):
        raise CorruptionError(f"{path} is not a JSON object: the store's description is damaged", str(path))
    need = {"format": int, "primary": str, "size": int, "block_size": int, "horizon_seq": int, "horizon_ns": int}
    for k, typ in need.items():
        if not isinstance(obj.get(k), typ):
            raise CorruptionError(f"{path}: field {k!r} is missing or wrong", str(path))
    if obj["format"] != FORMAT:
        raise BadInput(f"{path} is format {obj['format']}; this Rewind reads format {FORMAT}")
    bs = obj["block_size"]
    if bs < 512 or bs > (1 << 20) or bs & (bs - 1):
        raise CorruptionError(f"{path}: field 'block_size' ({bs}) is not a power of two from 512 to 1M", str(path))
    if obj["size"] <= 0 or obj["size"] % bs:
        raise CorruptionError(f"{path}: field 'size' ({obj['size']}) is not a multiple of 'block_size' ({bs})", str(path))
    stored = obj.pop("checksum", None)
    state = "missing" if stored is None else ("ok" if stored == _json_crc(obj) else "bad")
    return dict(obj), state
