"""Retention: merges and fades keep every retained point exact, refuse dropped ones, free space."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refmodel import Clock, Model
from rewind.engine.errors import BadInput, NoSpace, PointError
from rewind.engine.journal.segments import Journal
from rewind.engine.retention import Policy, plan, removable_versions
from rewind.engine.store import Store

BS = 512
NB = 32
SIZE = BS * NB
H = 3600


def retained_points(s: Store) -> list[int]:
    s._index_sync()
    return [seq for seq, _ in s._db.points(s.horizon - 1)] + [s.horizon]


def check_retained(s: Store, m: Model) -> int:
    n = 0
    for seq in sorted(set(retained_points(s))):
        if seq in m.points:
            assert s.at(seq).read(0, SIZE) == m.points[seq], f"seq {seq}"
            n += 1
    assert s.live.read(0, SIZE) == bytes(m.cur)
    return n


def test_policy_parsing() -> None:
    assert str(Policy.parse("24h:all,7d:1h,30d:1d")) == "1d:all,1w:1h,30d:1d"
    for bad in ("", "24h", "1h:all,30m:all", "7d:1h,30d:1m", "1h:1d", "x:all", "0h:all"):
        with pytest.raises(BadInput):
            Policy.parse(bad)


def test_plan_and_removable() -> None:
    pol = Policy.parse("1h:all,1d:10m")
    now = 10 * 86400 * 10**9
    pts = [(i, now - (3 * 86400 - i * 60) * 10**9) for i in range(1, 3 * 1440)]
    p = plan(pts, now, pol)
    assert p.horizon is not None
    assert 59 <= p.per_tier[0] <= 61  # every point of the last hour (one a minute)
    assert 137 <= p.per_tier[1] <= 139  # one per 10 minutes for the 23 hours before
    assert removable_versions([1, 5, 9], [5], 9) == [1]
    assert removable_versions([1, 5, 9], [6], 9) == [1]
    assert removable_versions([1, 5, 9], [9], 9) == [1, 5]
    assert removable_versions([1, 5, 12], [4], 9) == []  # point 10 (above the cutoff) reads 5


def simulate(tmp: Path, days: int, step_s: int, policy: str, fade_every_s: int) -> tuple[Store, Model, Clock, dict]:
    clock = Clock()
    s = Store.create(tmp / "d.img", tmp / "st", size=SIZE, block_size=BS, clock=clock)
    s.set_retention(policy=policy)
    m = Model(SIZE)
    m.snap(s.head)
    rnd = random.Random(11)
    report: dict = {"fades": 0, "max_journal": 0}
    elapsed = 0
    while elapsed < days * 86400:
        blk = rnd.randrange(NB)
        data = rnd.randbytes(BS * rnd.randrange(1, 3))
        off = min(blk * BS, SIZE - len(data))
        s.live.write(off, data)
        m.write(off, data)
        m.snap(s.head)
        if rnd.random() < 0.01:
            s.mark(f"m{elapsed}", pinned=rnd.random() < 0.2)
            m.snap(s.head)
        clock.advance(step_s)
        elapsed += step_s
        if elapsed % fade_every_s == 0:
            report["max_journal"] = max(report["max_journal"], s.journal.size_bytes())
            s.fade().run()
            report["fades"] += 1
    return s, m, clock, report


def test_simulated_month(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A month of writes every 10 minutes under 24h:all,7d:1h,30d:1d, then one fade."""
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 64 << 10)
    s, m, clock, rep = simulate(tmp_path, 31, 600, "24h:all,7d:1h,30d:1d", 10**9)
    try:
        before = s.journal.size_bytes()
        for k in range(1, len(m.points), 97):  # before fading, every point is there
            assert s.at(k).read(0, SIZE) == m.points[k]
        res = s.fade().run()
        assert s.journal.size_bytes() < before * 0.6
        n = check_retained(s, m)
        now = clock()
        pts = retained_points(s)
        ages = [(now - s.point_time(x)) / 1e9 for x in pts]
        tiers = [sum(a <= 86400 for a in ages), sum(86400 < a <= 7 * 86400 for a in ages),
                 sum(7 * 86400 < a <= 30 * 86400 for a in ages), sum(a > 30 * 86400 for a in ages)]
        print(f"\nsimulated month: {len(m.points)} points written, {n} kept and checked byte-exact")
        print(f"kept per tier: <=24h all: {tiers[0]}, 24h-7d hourly: {tiers[1]}, 7d-30d daily: {tiers[2]},"
              f" horizon and pinned older: {tiers[3]}")
        print(f"journal: {before} bytes before the fade, {s.journal.size_bytes()} after; fade: {res}")
        assert 140 <= tiers[0] <= 165  # every 10 minutes for a day, and the marks
        assert 6 * 24 - 2 <= tiers[1] <= 6 * 24 + 26  # about hourly for 6 days
        assert 21 <= tiers[2] <= 26 + 10  # about daily for 23 days (pinned marks add a few)
        # dropped points are refused with the nearest kept points named
        dropped = sorted(set(m.points) - set(pts) - {mk.seq for mk in s.marks()})
        some = [d for d in dropped if d > s.horizon][:20]
        assert some
        for d in some:
            with pytest.raises(PointError, match="nearest kept"):
                s.at(d)
        assert s.verify().run() == []
        # every kept point exports byte-exact
        for x in pts[:: max(1, len(pts) // 15)]:
            out = tmp_path / "x.img"
            s.export(x, out).run()
            assert out.read_bytes() == m.points[x]
        s.close()
        s = Store.open(tmp_path / "st", clock=clock)
        check_retained(s, m)
        # maps deleted: rebuilt from the journal, retention still applies
        s.close()
        for f in (tmp_path / "st").glob("maps.db*"):
            f.unlink()
        s = Store.open(tmp_path / "st", clock=clock)
        check_retained(s, m)
        for d in some[:3]:
            with pytest.raises(PointError):
                s.at(d)
    finally:
        s.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(st.tuples(st.sampled_from(["w", "w", "w", "z", "mark", "pin", "fade", "reopen"]),
                           st.integers(0, NB - 1), st.integers(1, 4000)), min_size=5, max_size=60),
    policy=st.sampled_from(["1h:all,1d:1h", "10m:all,2h:10m,1d:1h", "1h:1m,1d:1h", "30m:all"]),
)
def test_random_histories_and_policies(ops: list[tuple[str, int, int]], policy: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 16 << 10)
    tmp = Path(tempfile.mkdtemp())
    clock = Clock()
    try:
        s = Store.create(tmp / "d.img", tmp / "st", size=SIZE, block_size=BS, clock=clock)
        s.set_retention(policy=policy)
        m = Model(SIZE)
        m.snap(s.head)
        k = 0
        for op, blk, secs in ops:
            k += 1
            if op == "w":
                data = bytes([k % 256]) * BS * (1 + blk % 2)
                off = min(blk * BS, SIZE - len(data))
                s.live.write(off, data)
                m.write(off, data)
            elif op == "z":
                s.live.zero(blk * BS, BS)
                m.zero(blk * BS, BS)
            elif op in ("mark", "pin"):
                s.mark(f"k{k}", pinned=op == "pin")
            elif op == "fade":
                s.fade().run()
                check_retained(s, m)
            elif op == "reopen":
                s.close()
                s = Store.open(tmp / "st", clock=clock)
            m.snap(s.head)
            clock.advance(secs)
        s.fade().run()
        check_retained(s, m)
        for mk in s.marks():
            assert s.at(f"mark:{mk.name}").read(0, SIZE) == m.points[mk.seq]
        assert s.verify().run() == []
        s.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_pinned_mark_survives_fading(tmp_path: Path) -> None:
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=SIZE, block_size=BS, clock=clock)
    s.set_retention(policy="1h:all")
    s.live.write(0, b"a" * BS)
    s.mark("keep", pinned=True)
    s.live.write(0, b"b" * BS)
    s.mark("loose")
    s.live.write(BS, b"d" * BS)
    clock.advance(2 * H)
    s.live.write(0, b"c" * BS)
    s.fade().run()
    assert s.at("mark:keep").read(0, 1) == b"a"
    with pytest.raises(PointError):
        s.resolve("mark:loose")
    s.pin("keep", False)
    s.fade().run()
    with pytest.raises(PointError):
        s.resolve("mark:keep")
    assert s.live.read(0, 1) == b"c"
    s.close()


def test_persons_marks_kept_programs_marks_follow_retention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A person's marks (pinned: `rewind mark`, the console's Mark now) survive every fade; the
    program's (before-rewind-N, the demo's) go with their points; fade_preview says beforehand
    exactly what the fade then removes; a mark `--at` an earlier point and a removal are journaled
    (they survive an index rebuild and the compaction of their segments)."""
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 1200)  # a few records a segment: the fade reclaims
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=SIZE, block_size=BS, clock=clock)
    s.set_retention(policy="1h:all")
    for i in range(12):  # history older than every mark: it fades, and its segments go
        s.live.write(0, bytes([i + 1]) * BS)
        s.live.write(2 * BS, bytes([i + 1]) * BS)
    s.live.write(0, b"a" * BS)
    first = s.head
    s.live.write(BS, b"x" * BS)
    s.mark("mine", pinned=True)
    s.mark("demo-1-3-files")
    s.live.write(0, b"b" * BS)
    s.mark("before-rewind-1")
    later = s.mark("named-later", pinned=True, at=f"seq:{first}")  # a person names an earlier point
    assert later.seq == first and later.time_ns == s.point_time(first)
    for i in range(6):  # its MARK record's neighbours are overwritten: the fade reclaims that segment
        s.live.write(3 * BS, bytes([i + 1]) * BS)
    s.mark("gone-soon", pinned=True)
    s.unmark("gone-soon")
    with pytest.raises(BadInput):
        s.unmark("gone-soon")
    with pytest.raises(BadInput):
        s.mark("mine", pinned=True)
    clock.advance(2 * H)
    s.live.write(0, b"c" * BS)
    before = s.fade_preview()
    assert sorted(before["marks"]) == ["before-rewind-1", "demo-1-3-files"], before
    assert sorted(before["kept_marks"]) == ["mine", "named-later"]
    assert before["horizon_moves"] and before["points"] > 0
    faded = s.fade().run()
    assert faded["points_dropped"] == before["points"]
    assert faded["segments_deleted"] + faded["segments_compacted"] > 0, faded
    assert sorted(m.name for m in s.marks()) == ["mine", "named-later"]
    assert s.horizon == first  # the oldest kept mark holds the horizon
    assert s.point_time(s.horizon) == before["horizon"]["time_ns"]
    assert s.at("mark:named-later").read(0, 1) == b"a" and s.at("mark:mine").read(BS, 1) == b"x"
    s.close()
    (tmp_path / "st" / "maps.db").unlink()  # the index is rebuilt from the journal
    for p in (tmp_path / "st").glob("maps.db-*"):
        p.unlink()
    s = Store.open(tmp_path / "st", clock=clock)
    assert {m.name: (m.seq, m.pinned) for m in s.marks()} == {"mine": (first + 2, True), "named-later": (first, True)}
    assert s.at("mark:named-later").read(0, 1) == b"a"
    s.unmark("mine")
    clock.advance(2 * H)
    s.live.write(0, b"d" * BS)
    assert s.fade_preview()["marks"] == []  # a removed mark is no mark: its point follows retention
    s.fade().run()
    assert [m.name for m in s.marks()] == ["named-later"]
    s.close()


def test_marks_of_an_older_store_become_a_persons(tmp_path: Path) -> None:
    """A store from before marks belonged to a person: its marks are kept until removed on first
    open, except the names the program gives (before-rewind-N, demo-N-M-files)."""
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=SIZE, block_size=BS)
    s.live.write(0, b"a" * BS)
    for name in ("upgrade", "before-rewind-2", "demo-4-12-files"):
        s.mark(name)
    s.close()
    meta = json.loads((tmp_path / "st" / "store.json").read_text())
    del meta["marks_owned"], meta["checksum"]  # as an older Rewind wrote it
    (tmp_path / "st" / "store.json").write_text(json.dumps(meta))
    s = Store.open(tmp_path / "st")
    assert {m.name: m.pinned for m in s.marks()} == {"upgrade": True, "before-rewind-2": False,
                                                     "demo-4-12-files": False}
    assert any("kept until removed" in n for n in s.recovery)
    s.close()
    s = Store.open(tmp_path / "st")  # once only, and it lasts
    assert not s.recovery and json.loads((tmp_path / "st" / "store.json").read_text())["pinned"] == ["upgrade"]
    s.close()


def test_space_limit_fades_early_or_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 32 << 10)
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=SIZE, block_size=BS, clock=clock)
    s.set_retention(policy="30d:all", max_size=100 << 10)
    m = Model(SIZE)
    for i in range(600):
        data = bytes([i % 256]) * BS
        s.live.write((i % NB) * BS, data)
        m.write((i % NB) * BS, data)
        m.snap(s.head)
        clock.advance(60)
    assert s.over_limit()
    res = s.fade().run()
    assert "faded_early" in res and not s.over_limit()
    assert s.retention()["faded_early"]
    check_retained(s, m)
    s.set_retention(on_full="refuse", max_size=s.space_used() - 1)
    with pytest.raises(NoSpace):
        s.live.write(0, b"x" * BS)
    assert s.live.read(0, BS) == bytes(m.cur[:BS])  # the primary keeps its data
    s.close()


FADER = textwrap.dedent(
    """
    import sys
    from rewind.engine.journal.segments import Journal
    Journal.SEGMENT_LIMIT = 16 << 10
    from rewind.engine.store import Store
    clock_t = int(sys.argv[2])
    s = Store.open(sys.argv[1], clock=lambda: clock_t)
    print("go", flush=True)
    s.fade(throttle=0.002).run()
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.6, 1.0])
def test_kill9_during_fade_and_compaction(tmp_path: Path, delay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 16 << 10)
    clock = Clock()
    s = Store.create(tmp_path / "d.img", tmp_path / "st", size=SIZE, block_size=BS, clock=clock)
    s.set_retention(policy="1h:all,1d:1h")
    m = Model(SIZE)
    m.snap(s.head)
    rnd = random.Random(5)
    for _ in range(1500):
        data = rnd.randbytes(BS)
        off = rnd.randrange(NB) * BS
        s.live.write(off, data)
        m.write(off, data)
        m.snap(s.head)
        clock.advance(120)
    s.close()
    p = subprocess.Popen([sys.executable, "-c", FADER, str(tmp_path / "st"), str(clock())],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "go"
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    s = Store.open(tmp_path / "st", clock=clock)
    try:
        check_retained(s, m)
        s.fade().run()  # the next fade finishes the job
        n = check_retained(s, m)
        assert n > 10
        assert s.verify().run() == []
        assert not list((tmp_path / "st" / "journal").glob("*.new"))
        meta = json.loads((tmp_path / "st" / "store.json").read_text())
        assert meta["horizon_seq"] == s.horizon
    finally:
        s.close()
