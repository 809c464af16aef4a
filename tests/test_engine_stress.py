"""Fidelity corners of the engine, each driven deterministically through the public API:
a fade interleaved with writes (by stepping the fade job between its progress events), views held
across a fade, the index rebuilt from a compacted journal, unaligned I/O over a prefilled primary
at several block sizes, and live reads while the background applier still has work queued.

Every point checked must read exactly what the model held then, or be refused; never other bytes.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from refmodel import Clock, Model
from rewind.engine.errors import PointError
from rewind.engine.jobs import Job
from rewind.engine.journal.segments import Journal
from rewind.engine.store import Store


@pytest.fixture
def every_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs hand out every progress event, so a test can act between any two fade steps."""
    monkeypatch.setattr(Job, "THROTTLE_S", 0.0)


def retained(s: Store) -> list[int]:
    """Every point a user can still address: kept records past the horizon, and the horizon."""
    s.info()  # completes the index
    return sorted({q for q, _ in s._db.points(s.horizon - 1)} | {s.horizon})


def check_points(s: Store, m: Model, size: int) -> int:
    """Every retained point the model knows reads exactly as the model; returns how many."""
    n = 0
    for q in retained(s):
        if q in m.points:
            assert s.at(q).read(0, size) == m.points[q], f"seq {q}"
            n += 1
    assert s.live.read(0, size) == bytes(m.cur)
    return n


# --- fade interleaved with writes ----------------------------------------------------------------

def test_release_does_not_lose_horizon_contents_of_a_block_written_meanwhile(
        tmp_path: Path, every_event: None) -> None:
    """A block rewritten while the fade releases blocks keeps its horizon contents.

    _release lists its candidates (blocks whose only version is at or below the horizon) once, then
    deletes them chunk by chunk; a block written and indexed after the listing has two versions by
    the time its chunk comes, but its old one is deleted anyway and the block marked UNTOUCHED, so
    the horizon (and every point before the new write) reads the new data from the primary.
    """
    bs, size = 512, 8 << 20  # 16384 blocks: more than one release chunk (5000)
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=size, block_size=bs, clock=clock)
    try:
        s.set_retention(policy="1h:all")
        s.live.write(0, b"\1" * size)
        first = s.head
        clock.advance(7200)
        s.live.write(0, b"x" * bs)
        clock.advance(1)
        blk, written = 15000, False
        for ev in s.fade():
            if ev.phase == "release" and not written:  # the first chunk is done, the rest are pending
                s.live.write(blk * bs, b"N" * bs)
                s.info()  # the indexer commits the new version
                written = True
        assert written and s.horizon == first
        assert s.at(s.horizon).read(blk * bs, bs) == b"\1" * bs
        assert s.live.read(blk * bs, bs) == b"N" * bs
    finally:
        s.close()


def test_reclaim_keeps_records_written_during_the_fade(tmp_path: Path, every_event: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes that fill the active segment while a fade runs survive its reclaim step.

    fade_body indexes everything at its start; _reclaim later counts live bytes per segment from
    the database only and skips only the segment active *at reclaim time*. Records appended in
    between to the segment that was active at the start are in no committed row, so that segment
    looks mostly dead and is compacted (or deleted) without them: their points then fail with
    CorruptionError, verify reports index rows pointing at nothing, a crash loses them.
    """
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 16 << 10)
    bs, nb = 512, 64
    size = bs * nb
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=size, block_size=bs, clock=clock)
    m = Model(size)
    m.snap(s.head)
    k = 0

    def write() -> None:
        nonlocal k
        k += 1
        data = bytes([k % 251]) * bs
        s.live.write((k % nb) * bs, data)
        m.write((k % nb) * bs, data)
        m.snap(s.head)
        clock.advance(1)

    try:
        first = s.journal.segno
        while s.journal.segno == first or s.journal.end > 2000:  # a fresh segment with one record
            write()
        s.info()
        rolled = False
        for _ev in s.fade():
            if not rolled:  # right after fade_body indexed: fill the active segment, roll over
                seg = s.journal.segno
                while s.journal.segno == seg:
                    write()
                rolled = True
        bad = []
        for q in sorted(m.points):
            try:
                if s.at(q).read(0, size) != m.points[q]:
                    bad.append(q)
            except Exception as e:  # noqa: BLE001 - any failure to read a kept point is the bug
                bad.append(f"{q}: {type(e).__name__}")
        assert bad == []
        assert s.verify().run() == []
    finally:
        s.close()


def test_held_view_of_a_point_merged_away_is_refused_not_wrong(tmp_path: Path) -> None:
    """An export, NBD or FUSE view of a point keeps its Volume; a fade may merge the point away.

    Its reads must then fail with PointError (like resolve does), never return other bytes.
    """
    bs = 512
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=bs * 8, block_size=bs, clock=clock)
    try:
        s.set_retention(policy="1h:all,1d:1h")
        for i in range(6):
            s.live.write(0, bytes([65 + i]) * bs)
            clock.advance(60)
        clock.advance(7200)
        s.live.write(0, b"z" * bs)
        view = s.at(3)
        assert view.read(0, 1) == b"C"
        s.fade().run()
        with pytest.raises(PointError):
            s.resolve(3)
        try:
            got = view.read(0, 1)
        except PointError:
            return
        assert got == b"C", f"seq 3 was merged away, yet its held view read {got!r} instead of failing"
    finally:
        s.close()


# --- index rebuilt from a compacted journal ------------------------------------------------------

def _history_with_zeros(tmp: Path, seed: int) -> tuple[Store, Model, Clock, list[int]]:
    """Writes and zeroes under a merging policy with small segments, faded every 100 steps."""
    bs, nb = 512, 32
    size = bs * nb
    clock = Clock()
    rnd = random.Random(seed)
    s = Store.create(tmp / "d.img", tmp / "st", size=size, block_size=bs, clock=clock)
    s.set_retention(policy="1h:all,1d:1h")
    m = Model(size)
    m.snap(s.head)
    for i in range(400):
        b = rnd.randrange(nb)
        if rnd.random() < 0.25:
            n = rnd.randrange(1, 4) * bs
            off = min(b * bs, size - n)
            s.live.zero(off, n)
            m.zero(off, n)
        else:
            data = rnd.randbytes(bs)
            s.live.write(b * bs, data)
            m.write(b * bs, data)
        m.snap(s.head)
        clock.advance(rnd.randrange(30, 600))
        if i % 100 == 99:
            s.fade().run()
    s.fade().run()
    return s, m, clock, retained(s)


def test_rebuild_after_compaction_keeps_zeroed_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delete maps.db after a fade with compaction: a pinned mark taken after a zero still reads zeros.

    A ZERO record has no data, so its versions have loc -1 and never count as live bytes of its
    segment; compaction copies only rows with a location inside the segment (and marks), so the
    ZERO record is dropped although the mark still reads its zeros. The running index does not
    notice, but a rebuild from the journal no longer knows the block was zeroed and serves the
    older write. (Random histories hit the same: _history_with_zeros(seed=8) loses 5 points.)
    """
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 4 << 10)
    bs = 512
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=bs * 4, block_size=bs, clock=clock)
    try:
        s.set_retention(policy="1h:all")
        s.live.write(0, b"A" * bs)
        s.mark("a", pinned=True)
        s.live.zero(0, bs)
        s.mark("z", pinned=True)
        for i in range(40):  # history that merges away and fills segments
            s.live.write(bs, bytes([i]) * bs)
        clock.advance(2 * 86400)
        s.live.write(0, b"B" * bs)
        res = s.fade().run()
        assert res["segments_compacted"] + res["segments_deleted"] > 0
        assert s.at("mark:a").read(0, bs) == b"A" * bs
        assert s.at("mark:z").read(0, bs) == bytes(bs)
        s.close()
        for f in (tmp_path / "st").glob("maps.db*"):
            f.unlink()
        s = Store.open(tmp_path / "st", clock=clock)
        assert any("rebuilt" in r for r in s.recovery)
        assert s.at("mark:a").read(0, bs) == b"A" * bs
        assert s.at("mark:z").read(0, bs) == bytes(bs), "the zeroing of block 0 was lost by compaction"
        assert s.live.read(0, bs) == b"B" * bs
    finally:
        s.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rebuild_after_fades_keeps_retained_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   seed: int) -> None:
    """The same history shapes where compaction happens not to drop a needed ZERO record: the
    rebuilt index serves every retained point exactly and still refuses merged ones."""
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 8 << 10)
    s, m, clock, pts = _history_with_zeros(tmp_path, seed)
    size = s.size
    try:
        check_points(s, m, size)
        merged = [q for q in m.points if s.horizon < q < pts[-1] and q not in pts][:5]
        s.close()
        for f in (tmp_path / "st").glob("maps.db*"):
            f.unlink()
        s = Store.open(tmp_path / "st", clock=clock)
        assert retained(s) == pts
        assert check_points(s, m, size) > 10
        for q in merged:
            with pytest.raises(PointError, match="merged away"):
                s.at(q)
        assert s.verify().run() == []
        assert not list((tmp_path / "st" / "journal").glob("*.new"))
    finally:
        s.close()


# --- unaligned I/O over a prefilled primary ------------------------------------------------------

@pytest.mark.parametrize("bs", [512, 4096, 65536])
def test_unaligned_io_over_prefilled_primary(tmp_path: Path, bs: int) -> None:
    """A primary holding data (and holes) before protection; writes, zeroes and trims at any
    offset and length, straddling blocks, single and batched; every point, reopened too."""
    rnd = random.Random(bs)
    nb = 24
    size = bs * nb
    pre = bytearray(rnd.randbytes(size))
    for b in range(0, nb, 5):  # some blocks were zero before protection, some holes
        pre[b * bs : (b + 1) * bs] = bytes(bs)
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(size)
        for b in range(nb):
            if b % 7 != 3:  # block 3, 10, 17 stay holes
                f.seek(b * bs)
                f.write(pre[b * bs : (b + 1) * bs])
    for b in range(3, nb, 7):
        pre[b * bs : (b + 1) * bs] = bytes(bs)
    clock = Clock()
    m = Model(size)
    m.write(0, bytes(pre))
    s = Store.create(img, tmp_path / "st", block_size=bs, clock=clock)
    try:
        m.snap(s.head)
        for step in range(120):
            reqs: list[tuple[str, int, bytes | int]] = []
            for _ in range(rnd.randint(1, 4)):
                off = rnd.randrange(size)
                n = min(size - off, rnd.choice([1, 7, bs - 1, bs, bs + 3, 3 * bs - 5, rnd.randrange(1, 4 * bs)]))
                kind = rnd.choice(["write", "write", "zero", "trim"])
                if kind == "write":
                    data = rnd.randbytes(n)
                    reqs.append(("write", off, data))
                    m.write(off, data)
                else:
                    reqs.append((kind, off, n))
                    m.zero(off, n)
            if len(reqs) == 1 and step % 2:
                kind, off, x = reqs[0]
                if kind == "write":
                    assert isinstance(x, bytes)
                    s.live.write(off, x)
                else:
                    assert isinstance(x, int)
                    getattr(s.live, kind)(off, x)
            else:
                s.live.write_many(reqs)
            m.snap(s.head)
            clock.advance(1)
            if step % 40 == 39:
                s.close()
                s = Store.open(tmp_path / "st", clock=clock)
        for q, want in m.points.items():
            assert s.at(q).read(0, size) == want, f"bs {bs} seq {q}"
            off = rnd.randrange(size)  # and a short unaligned read of the same point
            n = rnd.randrange(1, min(3 * bs, size - off) + 1)
            assert s.at(q).read(off, n) == want[off : off + n], f"bs {bs} seq {q} read {off}+{n}"
        assert s.live.read(0, size) == bytes(m.cur)
        s.flush(primary=True)  # the lazy applier puts every write on the primary
        assert img.read_bytes() == bytes(m.cur)
        assert s.verify().run() == []
    finally:
        s.close()


# --- live reads while the applier is behind ------------------------------------------------------

@pytest.fixture
def big_store(tmp_path: Path) -> Iterator[tuple[Store, Clock]]:
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=32 << 20, block_size=4096, clock=clock)
    yield s, clock
    s.close()


def test_live_reads_right_after_big_writes(big_store: tuple[Store, Clock]) -> None:
    """Several MiB per write, then an immediate read of the live volume, of `now`, of the
    previous point and an unaligned overwrite: the queued primary writes are waited for."""
    s, clock = big_store
    rnd = random.Random(5)
    m = Model(s.size)
    m.snap(s.head)
    for i in range(6):
        n = rnd.randrange(2, 7) << 20
        off = rnd.randrange(0, s.size - n) // 512 * 512 + (i % 2) * 77  # some unaligned
        data = rnd.randbytes(n)
        prev = s.head
        s.live.write_many([("write", off, data), ("zero", (off + n // 2) // 4096 * 4096, 1 << 20)])
        m.write(off, data)
        m.zero((off + n // 2) // 4096 * 4096, 1 << 20)
        m.snap(s.head)
        lo, hi = max(0, off - 4096), min(s.size, off + n + 4096)
        assert s.live.read(lo, hi - lo) == bytes(m.cur[lo:hi]), f"live after write {i}"
        assert s.at("now").read(lo, hi - lo) == bytes(m.cur[lo:hi]), f"now after write {i}"
        assert s.at(prev).read(lo, hi - lo) == m.points[prev][lo:hi], f"previous point after write {i}"
        s.live.write(off + 5, b"abc")  # read-modify-write of a block the applier may not have yet
        m.write(off + 5, b"abc")
        m.snap(s.head)
        assert s.live.read(off, 4096) == bytes(m.cur[off : off + 4096])
        clock.advance(1)
    s.flush(primary=True)
    assert Path(s.primary_path).read_bytes() == bytes(m.cur)
    for q in list(m.points)[::5]:
        assert s.at(q).read(0, s.size) == m.points[q]


# --- verify while the volume is being written -----------------------------------------------------

def test_verify_while_writing_reports_no_false_damage(store: Store, every_event: None) -> None:
    """`rewind verify` through a serving store's control socket runs while clients write.

    verify_store scans each segment (under the lock), then reads every index row; a write indexed
    between the two points into journal bytes the scan never saw, and is reported as "not a
    journaled block" (and emitted as a "damage" event to consoles) though nothing is wrong.
    """
    store.live.write(0, b"a" * 8192)
    wrote = False
    job = store.verify()
    for ev in job:
        if ev.phase == "journal" and not wrote:
            store.live.write(16384, b"b" * 8192)
            store.info()  # indexed before verify reads the index
            wrote = True
    assert wrote
    assert job.result == []
    assert store.verify().run() == []


@pytest.mark.parametrize("policy", ["1h:all", "1h:all,7d:1h"], ids=["segments-deleted", "segments-compacted"])
def test_verify_while_fading_reports_no_false_damage(tmp_path: Path, every_event: None,
                                                     monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    """A verify and a fade at once (serve's retention thread, a user's `rewind verify`).

    verify takes the index rows first, then scans the segments one by one without the lock; a
    fade that deletes or compacts a segment in between removes or moves what those rows point
    at, and must not make verify fail or report damage that is not there.
    """
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 4 << 10)
    bs = 512
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=bs * 128, block_size=bs, clock=clock)
    try:
        s.set_retention(policy=policy)
        for i in range(60):  # many segments; much of their contents merges away
            s.live.write((i % 3) * bs, bytes([i]) * bs)
            if i % 2 == 0:
                s.live.write((10 + i // 2) * bs, b"L" * bs)  # lasting blocks: some segments stay
            if i % 7 == 0:
                s.live.zero(8 * bs, 2 * bs)
            clock.advance(60)
        clock.advance(2 * 86400)
        s.live.write(127 * bs, b"new" * 100)
        want = s.live.read(0, s.size)
        faded: dict[str, int] = {}
        fader: threading.Thread | None = None
        job = s.verify()
        for ev in job:
            if ev.phase == "journal" and fader is None:  # the fade runs (or waits) in its own thread
                fader = threading.Thread(target=lambda: faded.update(s.fade().run()))
                fader.start()
                fader.join(1.0)
        assert fader is not None
        fader.join(60)
        assert not fader.is_alive()
        assert faded["segments_deleted"] + faded["segments_compacted"] > 0
        assert job.result == [], job.result[:3]
        assert s.verify().run() == []
        assert s.live.read(0, s.size) == want
    finally:
        s.close()


# --- a kill right after a new segment was created --------------------------------------------------

@pytest.mark.parametrize("left", [0, 7], ids=["empty", "half-header"])
def test_kill_between_creating_a_segment_and_writing_its_header(tmp_path: Path, left: int) -> None:
    """Journal._new_segment creates the file, then writes its 16-byte header: a kill -9 between the
    two (seen in test_concurrency's kill -9 runs) leaves an empty (or short) last segment. The
    next open must leave a journal that later writes can go on: flushed writes and marks made
    after that recovery must survive the following open, and verify must be clean."""
    bs = 512
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=bs * 8, block_size=bs, clock=clock)
    s.live.write(0, b"a" * bs)
    s.close()
    seg1 = (tmp_path / "st" / "journal" / "seg-00000001.rwj").read_bytes()
    (tmp_path / "st" / "journal" / "seg-00000002.rwj").write_bytes(seg1[:left])  # header never written
    s = Store.open(tmp_path / "st", clock=clock)
    try:
        s.live.write(bs, b"b" * bs)
        s.flush()
        s.mark("after")
        assert s.verify().run() == []
        s.close()
        s = Store.open(tmp_path / "st", clock=clock)
        assert s.live.read(0, 2 * bs) == b"a" * bs + b"b" * bs
        assert s.at("mark:after").read(0, 2 * bs) == b"a" * bs + b"b" * bs
        assert s.verify().run() == []
    finally:
        s.close()


# --- index snapshots ------------------------------------------------------------------------------

def test_past_reads_see_versions_indexed_after_a_single_block_read(store: Store) -> None:
    """A one-block past read, then more history indexed, then a big read of a later point.

    A SELECT left unfinished keeps its connection's read transaction open, so every other query
    on that connection sees the database as it was then. Versions committed by the indexer since
    are gone from the pending generations, so a range read of a newer point falls back to older
    versions: wrong bytes, no error. (It also pins the WAL, which then cannot be checkpointed.)
    """
    s = store
    bs = s.block_size
    s.live.write(0, b"a" * bs * 32)
    first = s.head
    s.live.write(0, b"x" * bs * 32)
    s.info()  # indexed
    assert s.at(first).read(0, 10) == b"a" * 10  # a single-block read through MapDB.newest
    s.live.write(0, b"b" * bs * 32)
    point = s.head
    s.info()  # indexed by the indexer's own connection; the pending rows are dropped
    s.live.write(40 * bs, b"c" * bs)
    assert s.at(point).read(0, 32 * bs) == b"b" * bs * 32


def test_rebuild_does_not_resurrect_versions_behind_a_released_block(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Block 0: written (A), later zeroed; both fade behind the horizon. The fade removes A's
    version (the zero shadows it), then releases the block (its one version is at or below the
    horizon: the primary holds it) and reclaims the zero's segment. A's record lives on in a
    segment that is mostly live, so a rebuild of maps.db finds it again and the horizon reads A.
    (Seen in test_concurrency's threads test, compacting variant, after the rebuild.)"""
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 4 << 10)
    bs = 512
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=bs * 32, block_size=bs, clock=clock)
    try:
        s.set_retention(policy="1h:all")
        s.live.write(0, b"A" * bs)
        lasting, b = [], 5
        while s.journal.segno == 1:  # the rest of segment 1: data that stays live
            s.live.write(b * bs, b"L" * bs)
            lasting.append(b)
            b += 1
        clock.advance(60)
        s.live.zero(0, bs)
        for i in range(20):  # history that merges away
            s.live.write(bs, bytes([i]) * bs)
            clock.advance(1)
        clock.advance(2 * 86400)
        for b in lasting:  # keeps segment 1's versions live (the horizon reads them)
            s.live.write(b * bs, b"N" * bs)
        res = s.fade().run()
        assert res["blocks_released"] > 0
        want = s.at(s.horizon).read(0, s.size)
        assert want[:bs] == bytes(bs)
        hz = s.horizon
        s.close()
        for f in (tmp_path / "st").glob("maps.db*"):
            f.unlink()
        s = Store.open(tmp_path / "st", clock=clock)
        assert s.horizon == hz
        got = s.at(hz).read(0, s.size)
        assert got[:bs] == bytes(bs), "block 0 at the horizon reads its removed older version after the rebuild"
        assert got == want
    finally:
        s.close()
