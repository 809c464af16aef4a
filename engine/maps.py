"""Delta maps in SQLite (apsw, WAL): the index over the journal.

`versions` holds, per block, every version kept and where it lies in the journal; `maps` cuts the
sequence of records into stretches of time (the delta maps of the seed: each one knows which
blocks changed between its two points). The journal is the truth; everything here can be rebuilt
from it, and `meta.indexed_*` says how far the index has got.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from .journal.record import Kind

SCHEMA_VERSION = 2
BULK_ROWS = 64  # commits with this many rows of a table insert them in one statement
MANY_CHUNK = 256  # blocks per newest_many statement (a power of two)
_ROWS = {1 << e: ",".join(["(?)"] * (1 << e)) for e in range(MANY_CHUNK.bit_length())}
JSON_CHUNK = 4096  # rows encoded per json.dumps call: each call holds the GIL throughout
MARK_KIND = int(Kind.MARK)
POINTS_CHUNK = 20_000  # points fetched per statement (see MapDB.points)
CACHE_KIB = 64 << 10  # per connection; SQLite's default 2 MiB misses on every descent past 1M rows

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions(
    block INTEGER NOT NULL, seq INTEGER NOT NULL, loc INTEGER NOT NULL, crc INTEGER NOT NULL,
    PRIMARY KEY(block, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records(
    seq INTEGER PRIMARY KEY, time INTEGER NOT NULL, kind INTEGER NOT NULL,
    block INTEGER NOT NULL, count INTEGER NOT NULL, map_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS records_time ON records(time);
CREATE TABLE IF NOT EXISTS maps(
    id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    first_time INTEGER NOT NULL, last_time INTEGER NOT NULL, kind TEXT NOT NULL,
    entries INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS marks(
    name TEXT PRIMARY KEY, seq INTEGER NOT NULL, time INTEGER NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS stats(
    t INTEGER PRIMARY KEY, writes INTEGER NOT NULL, bytes INTEGER NOT NULL,
    journal_bytes INTEGER NOT NULL);
"""

def json_rows(rows: Sequence[Any]) -> str:
    """A JSON array of `rows`, encoded a few thousand at a time: the writer thread gets the GIL
    between pieces (one json.dumps of 100k rows held it for a tenth of a second)."""
    if len(rows) <= JSON_CHUNK:
        return json.dumps(rows)
    dumps = json.dumps
    return "[" + ",".join([dumps(rows[i : i + JSON_CHUNK])[1:-1] for i in range(0, len(rows), JSON_CHUNK)]) + "]"


# Migrations: MIGRATIONS[n] takes a database at user_version n to n + 1.
# v2: retention merges points away; their records stay (diff needs them) but are marked gone.
MIGRATIONS: dict[int, str] = {
    0: SCHEMA_V1,
    1: "ALTER TABLE records ADD COLUMN gone INTEGER NOT NULL DEFAULT 0;",
}


@dataclass(frozen=True)
class MapInfo:
    """One delta map: the stretch of records it covers and how many block versions it indexes."""

    id: int
    first_seq: int
    last_seq: int
    first_time: int
    last_time: int
    kind: str
    entries: int


@dataclass(frozen=True)
class Mark:
    name: str
    seq: int
    time_ns: int
    pinned: bool = False


Version = tuple[int, int, int]  # (seq, loc, crc)


class MapDB:
    """One connection to maps.db. The Store gives each thread that needs one its own."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        self.path = path
        # writers of one store share this lock (the store's commit lock): SQLite's busy waiting
        # is not fair, and a steady indexer could starve a fade's transaction for ever
        self.lock: contextlib.AbstractContextManager[Any] | None = None
        self.db = apsw.Connection(str(path), flags=flags)
        self.db.set_busy_timeout(10_000)
        self._cur = self.db.cursor()
        if not readonly:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.migrate()
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # past reads descend the versions b-tree

    def close(self) -> None:
        self.db.close()

    # schema ------------------------------------------------------------------------------
    def user_version(self) -> int:
        return int(self.one("PRAGMA user_version") or 0)

    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one recorded step at a time."""
        v = self.user_version()
        if v > SCHEMA_VERSION:
            raise RuntimeError(f"maps.db has schema {v}, newer than this Rewind ({SCHEMA_VERSION}); upgrade Rewind")
        while v < SCHEMA_VERSION:
            with self.db:
                self.db.execute(MIGRATIONS[v])
                v += 1
                self.db.execute(f"PRAGMA user_version={v}")

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """A write transaction that takes the write lock up front (BEGIN IMMEDIATE), so it waits
        its turn (busy timeout) instead of failing when another connection committed meanwhile."""
        with self.lock or contextlib.nullcontext():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # helpers -----------------------------------------------------------------------------
    def one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        rows = self.db.execute(sql, args).fetchall()  # to the end, so no read snapshot stays open
        return rows[0][0] if rows else None

    def get_meta(self, key: str, default: Any = None) -> Any:
        v = self.one("SELECT value FROM meta WHERE key=?", (key,))
        return default if v is None else v

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    # writes (indexer thread) -------------------------------------------------------------
    def commit(
        self,
        versions: list[tuple[int, int, int, int]],
        records: list[tuple[int, int, int, int, int, int]],
        marks: list[tuple[str, int, int, int]],
        unmarks: list[str],
        meta: dict[str, Any],
        block_size: int,
        journal_bytes: int,
    ) -> None:
        """Persist one generation of index rows in a single transaction; the delta maps' spans
        and the per-second stats are summed up from its records by SQLite."""
        with self.write():
            self._insert("versions", ("block", "seq", "loc", "crc"), versions, " ORDER BY 1, 2")
            self._insert("records", ("seq", "time", "kind", "block", "count", "map_id"), records)
            if records:
                lo, hi = records[0][0], records[-1][0]
                # a mark record belongs to its map but holds no blocks
                self.db.execute(
                    "INSERT INTO maps(id, first_seq, last_seq, first_time, last_time, kind, entries)"
                    " SELECT map_id, min(seq), max(seq), min(time), max(time), 'live',"
                    f" sum(CASE WHEN kind={MARK_KIND} THEN 0 ELSE count END) FROM records"
                    " WHERE seq BETWEEN ? AND ? GROUP BY map_id"
                    " ON CONFLICT(id) DO UPDATE SET last_seq=excluded.last_seq,"
                    " last_time=excluded.last_time, entries=entries+excluded.entries",
                    (lo, hi),
                )
                self.db.execute(
                    "INSERT INTO stats SELECT time / 1000000000, count(*), sum(count) * ?, ? FROM records"
                    f" WHERE seq BETWEEN ? AND ? AND kind != {MARK_KIND} AND count > 0 GROUP BY 1"
                    " ON CONFLICT(t) DO UPDATE SET writes=writes+excluded.writes, bytes=bytes+excluded.bytes,"
                    " journal_bytes=excluded.journal_bytes",
                    (block_size, journal_bytes, lo, hi),
                )
            for name, seq, t, pinned in marks:
                self.db.execute("INSERT OR REPLACE INTO marks VALUES(?,?,?,?)", (name, seq, t, pinned))
            for name in unmarks:
                self.db.execute("DELETE FROM marks WHERE name=?", (name,))
            for k, v in meta.items():
                self.set_meta(k, v)

    def drop_points(self, seqs: Sequence[int], horizon: int) -> None:
        """Retention merged these points away: their records stay (diff needs them) but are
        marked gone, and their unpinned marks go; everything before the horizon goes."""
        js = json_rows(seqs)
        self.db.execute("UPDATE records SET gone=1 WHERE seq IN (SELECT value FROM json_each(?))", (js,))
        self.db.execute("DELETE FROM records WHERE seq<?", (horizon,))
        self.db.execute("DELETE FROM marks WHERE pinned=0 AND seq<?", (horizon,))
        self.db.execute("DELETE FROM marks WHERE pinned=0 AND seq IN (SELECT value FROM json_each(?))", (js,))

    def delete_versions(self, keys: Sequence[tuple[int, int]]) -> None:
        """Delete versions by (block, seq) in one statement (no GIL round trip per row)."""
        if keys:
            self.db.execute(
                "DELETE FROM versions WHERE (block, seq) IN (SELECT value->>0, value->>1 FROM json_each(?))",
                (json_rows(keys),),
            )

    def _insert(self, table: str, columns: tuple[str, ...], rows: Sequence[tuple[int, ...]], order: str = "") -> None:
        """INSERT OR REPLACE many rows as one JSON array in one statement: executemany takes and
        drops the GIL around every row, and each time the writer thread had to hand it back (a
        convoy that halved 4 KiB write rates). `order` sorts them inside SQLite first (sorted
        inserts walk the b-tree in order, a third faster). A few rows go in plainly."""
        if not rows:
            return
        cols = ", ".join(columns)
        if len(rows) >= BULK_ROWS:
            picks = ", ".join(f"value->>{i}" for i in range(len(columns)))
            sql = f"INSERT OR REPLACE INTO {table}({cols}) SELECT {picks} FROM json_each(?){order}"
            self.db.execute(sql, (json_rows(rows),))
        else:
            self.db.executemany(f"INSERT OR REPLACE INTO {table}({cols}) VALUES({', '.join('?' * len(columns))})", rows)

    # reads -------------------------------------------------------------------------------
    def newest(self, block: int, seq: int) -> Version | None:
        """The newest version of `block` at or before `seq`: one b-tree descent, on a kept cursor."""
        rows = self._cur.execute(
            "SELECT seq, loc, crc FROM versions WHERE block=? AND seq<=? ORDER BY seq DESC LIMIT 1",
            (block, seq),
        ).fetchall()  # to the end: a statement left active would pin this connection's snapshot
        if not rows:
            return None
        s, loc, crc = rows[0]
        return (int(s), int(loc), int(crc))  # type: ignore[arg-type]

    def newest_range(self, b0: int, b1: int, seq: int) -> dict[int, Version]:
        """Newest version at or before `seq` of every block in [b0, b1) that has one: two index
        probes per block, all inside SQLite (a big read does not pay a Python round trip per block)."""
        out: dict[int, Version] = {}
        for b, s, loc, crc in self.db.execute(
            "WITH RECURSIVE r(b) AS (SELECT ? UNION ALL SELECT b + 1 FROM r WHERE b + 1 < ?) "
            "SELECT v.block, v.seq, v.loc, v.crc FROM r JOIN versions v ON v.block = r.b AND v.seq = "
            "(SELECT max(seq) FROM versions WHERE block = r.b AND seq <= ?)",
            (b0, b1, seq),
        ):
            out[int(b)] = (int(s), int(loc), int(crc))
        return out

    def newest_many(self, blocks: list[int], seq: int) -> dict[int, Version]:
        """newest() for a list of blocks in one statement (two index probes each, inside SQLite).
        The blocks are bound as a VALUES list (half the cost of decoding them from JSON), padded
        with -1 (no such block) to a power of two: a handful of statement texts for apsw to cache."""
        out: dict[int, Version] = {}
        for i in range(0, len(blocks), MANY_CHUNK):
            part = blocks[i : i + MANY_CHUNK]
            k = 1 << (len(part) - 1).bit_length()
            for b, s, loc, crc in self.db.execute(
                f"SELECT v.block, v.seq, v.loc, v.crc FROM (VALUES {_ROWS[k]}) j JOIN versions v"
                " ON v.block = j.column1 AND v.seq ="
                " (SELECT max(seq) FROM versions WHERE block = j.column1 AND seq <= ?)",
                (*part, *[-1] * (k - len(part)), seq),
            ):
                out[int(b)] = (int(s), int(loc), int(crc))
        return out

    def touched_blocks(self) -> Iterator[tuple[int, int]]:
        """(block, newest seq) of every block that has any version: the copy-on-first-write bitmap
        and the last-write array are rebuilt from these."""
        for b, s in self.db.execute("SELECT block, max(seq) FROM versions GROUP BY block"):
            yield int(b), int(s)

    def changed_between(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        """(block, count) runs of WRITE/ZERO records with a < seq <= b."""
        for blk, cnt in self.db.execute(
            "SELECT block, count FROM records WHERE seq>? AND seq<=? AND kind IN (1,3)", (a, b)
        ):
            yield int(blk), int(cnt)

    def seq_at_time(self, t: int) -> int | None:
        v = self.one("SELECT max(seq) FROM records WHERE time<=?", (t,))
        return None if v is None else int(v)

    def kept_neighbours(self, seq: int) -> tuple[int | None, int | None]:
        """The nearest still-addressable points around `seq`."""
        lo = self.one("SELECT max(seq) FROM records WHERE seq<? AND gone=0", (seq,))
        hi = self.one("SELECT min(seq) FROM records WHERE seq>? AND gone=0", (seq,))
        return (None if lo is None else int(lo)), (None if hi is None else int(hi))

    def points(self, after: int) -> list[tuple[int, int]]:
        """Addressable (seq, time) points newer than `after`, in order.

        Fetched as JSON, POINTS_CHUNK rows a statement: iterating a cursor row by row takes and
        drops the GIL around each row, and a fade listing a million points made writers wait."""
        out: list[tuple[int, int]] = []
        while True:
            got = self.one(
                "SELECT json_group_array(json_array(seq, time)) FROM"
                " (SELECT seq, time FROM records WHERE seq>? AND gone=0 ORDER BY seq LIMIT ?)",
                (after, POINTS_CHUNK),
            )
            rows = sorted(json.loads(got)) if got else []  # (the subquery's order, but it is not promised)
            out.extend((int(s), int(t)) for s, t in rows)
            if len(rows) < POINTS_CHUNK:
                return out
            after = out[-1][0]

    def record_time(self, seq: int) -> int | None:
        v = self.one("SELECT time FROM records WHERE seq<=? ORDER BY seq DESC LIMIT 1", (seq,))
        return None if v is None else int(v)

    def marks(self) -> list[Mark]:
        return [
            Mark(str(n), int(s), int(t), bool(p))
            for n, s, t, p in self.db.execute("SELECT name, seq, time, pinned FROM marks ORDER BY seq")
        ]

    def mark(self, name: str) -> Mark | None:
        for n, s, t, p in self.db.execute("SELECT name, seq, time, pinned FROM marks WHERE name=?", (name,)).fetchall():
            return Mark(str(n), int(s), int(t), bool(p))  # type: ignore[arg-type]
        return None

    def maps(self) -> list[MapInfo]:
        return [
            MapInfo(*(int(x) if i != 5 else str(x) for i, x in enumerate(r)))  # type: ignore[arg-type]
            for r in self.db.execute(
                "SELECT id, first_seq, last_seq, first_time, last_time, kind, entries FROM maps ORDER BY first_seq, id"
            )
        ]

    def stats(self, since: int | None, until: int | None) -> list[tuple[int, int, int, int]]:
        return [
            (int(t), int(w), int(b), int(j))
            for t, w, b, j in self.db.execute(
                "SELECT t, writes, bytes, journal_bytes FROM stats WHERE t>=? AND t<=? ORDER BY t",
                (since if since is not None else -(1 << 62), until if until is not None else 1 << 62),
            )
        ]

    def record_journal_size(self, t: int, journal_bytes: int) -> None:
        """A stats row for a second without writes (after a fade), so charts show the drop."""
        with self.write():
            self.db.execute(
                "INSERT INTO stats VALUES(?,0,0,?) ON CONFLICT(t) DO UPDATE SET journal_bytes=excluded.journal_bytes",
                (t, journal_bytes),
            )

    def count(self, table: str) -> int:
        assert table in ("versions", "records", "maps", "marks", "stats")
        return int(self.one(f"SELECT count(*) FROM {table}") or 0)

    def all_versions(self) -> Iterable[tuple[int, int, int, int]]:
        for b, s, loc, crc in self.db.execute("SELECT block, seq, loc, crc FROM versions"):
            yield int(b), int(s), int(loc), int(crc)
