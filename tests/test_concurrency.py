"""The engine under concurrency and crashes: fidelity is the product.

1. One writer thread sends random write/zero/trim batches while other threads read past points,
   fade with a merging policy, export, mark and verify, all at once. Every read of a point that is
   still addressable equals the model; at the end every retained point and mark does, and
   verify() is clean, also after a reopen.
2. A child process writes, flushes, marks and fades (small segments: compaction) in two threads
   and is SIGKILLed at random moments; after each restart nothing acknowledged is lost, every
   retained point reads as the model, verify() is clean and no *.new file remains.

Reproduce a crash run with REWIND_STRESS_SEED=<seed printed on failure>.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from refmodel import Clock
from rewind.engine.errors import PointError
from rewind.engine.journal.segments import Journal
from rewind.engine.store import Store

BS = 512
NB = 512
SIZE = BS * NB
CRASH_SIZE = 128 << 10  # the kill -9 test keeps a copy per step
POLICY = "1m:all,10m:1m,40m:5m"


def random_batch(rnd: random.Random, size: int) -> list[tuple[str, int, bytes | int]]:
    """A few requests at any offset and length, some straddling blocks."""
    reqs: list[tuple[str, int, bytes | int]] = []
    for _ in range(rnd.randint(1, 4)):
        off = rnd.randrange(size)
        n = min(size - off, rnd.choice([1, BS - 3, BS, 2 * BS + 5, rnd.randrange(1, 16 * BS)]))
        r = rnd.random()
        if r < 0.7:
            reqs.append(("write", off, rnd.randbytes(n)))
        else:
            reqs.append(("zero" if r < 0.85 else "trim", off, n))
    return reqs


def apply(model: bytearray, reqs: list[tuple[str, int, bytes | int]]) -> None:
    for kind, off, x in reqs:
        if kind == "write":
            assert isinstance(x, bytes)
            model[off : off + len(x)] = x
        else:
            assert isinstance(x, int)
            model[off : off + x] = bytes(x)


def addressable(s: Store, seq: int) -> bool:
    try:
        s.resolve(seq)
        return True
    except PointError:
        return False


def retained(s: Store) -> list[int]:
    """Points the index lists as kept and resolve accepts. (After a kill between fade's decision in
    store.json and its records update, the index still lists points resolve refuses; the next fade
    settles that. Those are refused, never served wrong, so they are left out here.)"""
    s.info()
    return sorted(q for q in {q for q, _ in s._db.points(s.horizon - 1)} | {s.horizon} if addressable(s, q))


def state_at(snaps: dict[int, bytes], seq: int) -> bytes:
    """The model at any seq between batches (a mark): the snapshot with the largest key <= seq."""
    return snaps[max(k for k in snaps if k <= seq)]


@dataclass
class Shared:
    """What the writer publishes and the checkers read (snapshots keyed by store.head)."""

    snaps: dict[int, bytes] = field(default_factory=dict)
    keys: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def pick(self, rnd: random.Random) -> tuple[int, bytes]:
        with self.lock:
            k = self.keys[rnd.randrange(len(self.keys))] if rnd.random() < 0.5 else self.keys[-1 - rnd.randrange(min(20, len(self.keys)))]
            return k, self.snaps[k]

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1


def run_threads(s: Store, clock: Clock, seconds: float, seed: int, verify: bool) -> Shared:
    sh = Shared()
    model = bytearray(s.live.read(0, SIZE))
    sh.snaps[s.head] = bytes(model)
    sh.keys.append(s.head)

    def guard(name: str, body: Callable[[random.Random], None]) -> Callable[[], None]:
        def run() -> None:
            rnd = random.Random(f"{seed}-{name}")
            try:
                while not sh.stop.is_set():
                    body(rnd)
            except Exception as e:  # noqa: BLE001 - reported by the test
                sh.errors.append(f"{name}: {type(e).__name__}: {e}")
                sh.stop.set()

        return run

    def writer(rnd: random.Random) -> None:
        reqs = random_batch(rnd, SIZE)
        s.live.write_many(reqs, fua=rnd.random() < 0.02)
        apply(model, reqs)
        head = s.head  # a mark taken meanwhile is a point with the same contents
        with sh.lock:
            sh.snaps[head] = bytes(model)
            sh.keys.append(head)
        clock.advance(rnd.uniform(2, 40))
        if rnd.random() < 0.05:
            s.flush()
        sh.count("batches")

    def reader(rnd: random.Random) -> None:
        seq, want = sh.pick(rnd)
        try:
            v = s.at(seq)
            off = rnd.randrange(SIZE) if rnd.random() < 0.5 else 0
            n = SIZE - off if off == 0 else rnd.randrange(1, SIZE - off + 1)
            got = v.read(off, n)
        except PointError:
            sh.count("refused")
            return
        if got != want[off : off + n]:
            raise AssertionError(f"seq {seq} read {off}+{n} differs from the model"
                                 f"{'' if addressable(s, seq) else ' (merged away meanwhile: it must be refused)'}")
        sh.count("reads")

    def fader(rnd: random.Random) -> None:
        res = s.fade(throttle=0.001).run()
        sh.count("fades")
        with sh.lock:
            for k in ("segments_deleted", "segments_compacted", "versions_removed"):
                sh.counts[k] = sh.counts.get(k, 0) + int(res[k])
        time.sleep(rnd.uniform(0.05, 0.2))

    def exporter(rnd: random.Random) -> None:
        seq, want = sh.pick(rnd)
        out = s.dir.parent / f"export-{rnd.randrange(1 << 30)}.img"
        try:
            s.export(seq, out).run()
        except PointError:
            sh.count("exports refused")
            return
        got = out.read_bytes()
        out.unlink()
        if got != want:
            raise AssertionError(f"export of seq {seq} differs from the model")
        sh.count("exports")

    def marker(rnd: random.Random) -> None:
        s.mark(f"m{rnd.randrange(1 << 40)}", pinned=rnd.random() < 0.1)
        sh.count("marks")
        time.sleep(rnd.uniform(0.01, 0.08))

    def verifier(rnd: random.Random) -> None:
        problems = s.verify().run()
        if problems:
            raise AssertionError(f"verify while busy: {problems[:3]}")
        sh.count("verifies")
        time.sleep(rnd.uniform(0.1, 0.3))

    bodies = {"writer": writer, "reader1": reader, "reader2": reader, "fader": fader,
              "exporter": exporter, "marker": marker}
    if verify:
        bodies["verifier"] = verifier
    threads = [threading.Thread(target=guard(n, b), name=n) for n, b in bodies.items()]
    for t in threads:
        t.start()
    sh.stop.wait(seconds)
    sh.stop.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), f"{t.name} hangs"
    return sh


def check_final(s: Store, sh: Shared, what: str) -> int:
    n = 0
    for q in retained(s):
        if q in sh.snaps:
            assert s.at(q).read(0, SIZE) == sh.snaps[q], f"{what}: seq {q}"
            n += 1
    for mk in s.marks():
        if mk.seq >= sh.keys[0]:
            assert s.at(f"mark:{mk.name}").read(0, SIZE) == state_at(sh.snaps, mk.seq), f"{what}: mark {mk.name}"
    assert s.live.read(0, SIZE) == sh.snaps[sh.keys[-1]], f"{what}: live"
    assert s.verify().run() == [], what
    return n


@pytest.mark.parametrize("segment_limit", [256 << 20, 32 << 10], ids=["big-segments", "compacting"])
def test_threads_read_fade_export_mark_verify_while_writing(tmp_path: Path, segment_limit: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """All the engine's concurrent users at once. With small segments the fades also delete and
    compact segments while writes go on (verify then stays out: a verify racing a compaction is
    test_engine_stress's test_verify_while_fading_reports_no_false_damage)."""
    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", segment_limit)
    compacting = segment_limit < (1 << 20)
    seed = int(os.environ.get("REWIND_STRESS_SEED", random.randrange(1 << 30)))
    print(f"REWIND_STRESS_SEED={seed}")
    clock = Clock()
    rnd = random.Random(seed)
    img = tmp_path / "d.img"
    img.write_bytes(rnd.randbytes(SIZE // 2) + bytes(SIZE // 2))  # data before protection, and zeros
    s = Store.create(img, tmp_path / "st", block_size=BS, clock=clock)
    try:
        s.set_retention(policy=POLICY)
        sh = run_threads(s, clock, 6.0, seed, verify=not compacting)
        assert not sh.errors, f"seed {seed}: {sh.errors}"
        print(f"seed {seed}: {sh.counts}, {len(s.journal.segment_numbers())} segments")
        assert sh.counts.get("batches", 0) > 100 and sh.counts.get("reads", 0) > 50
        assert sh.counts["versions_removed"] > 0
        if compacting:
            assert sh.counts["segments_deleted"] + sh.counts["segments_compacted"] > 0
        assert sh.counts.get("fades", 0) > 3 and sh.counts.get("marks", 0) > 5
        s.fade().run()
        n = check_final(s, sh, f"seed {seed}")
        assert n > 8
        merged = [q for q in sh.keys if s.horizon < q and not addressable(s, q)]
        assert merged, "the policy merged nothing: the test lost its point"
        s.close()
        s = Store.open(tmp_path / "st", clock=clock)
        check_final(s, sh, f"seed {seed} reopened")
        if compacting:  # and the index rebuilt from the compacted journal
            s.close()
            for f in (tmp_path / "st").glob("maps.db*"):
                f.unlink()
            s = Store.open(tmp_path / "st", clock=clock)
            check_final(s, sh, f"seed {seed} rebuilt")
            assert not list((tmp_path / "st" / "journal").glob("*.new"))
    finally:
        s.close()


# --- kill -9 of a busy writer -----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import random, sys, threading, time
    sys.path.insert(0, sys.argv[4])
    from test_concurrency import CRASH_SIZE, random_batch
    from rewind.engine.journal.segments import Journal
    Journal.SEGMENT_LIMIT = 24 << 10
    from rewind.engine.store import Store

    store_dir, seed, step, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
    T0 = 1_800_000_000 * 10**9
    now = [T0 + step * 20 * 10**9]
    s = Store.open(store_dir, clock=lambda: now[0])
    s.set_retention(policy="@POLICY@")
    print("ready", s.head, flush=True)

    def fades():
        while True:
            s.fade(throttle=0.001).run()
            time.sleep(0.02)

    if mode == "thread":
        threading.Thread(target=fades, daemon=True).start()
    while True:
        step += 1
        rnd = random.Random(seed * 1_000_003 + step)
        s.live.write_many(random_batch(rnd, CRASH_SIZE))
        print("step", step, s.head, flush=True)
        now[0] = T0 + step * 20 * 10**9
        if rnd.random() < 0.3:
            s.flush()
            print("flushed", step, flush=True)
        if mode == "inline" and step % 25 == 0:
            s.fade().run()
            print("faded", step, flush=True)
        if rnd.random() < 0.1:
            m = s.mark(f"c{step}", pinned=rnd.random() < 0.2)
            print("mark", m.name, m.seq, step, flush=True)
    """
).replace("@POLICY@", POLICY)


def run_child(store_dir: Path, seed: int, step: int, kill_after: float, mode: str) -> list[list[str]]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(store_dir), str(seed), str(step),
                          str(Path(__file__).parent), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        first = p.stdout.readline()
        assert first.startswith("ready"), (first, p.stderr.read() if p.stderr else "")
        time.sleep(kill_after)
    finally:
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=30)
    want = {"ready": 2, "step": 3, "flushed": 2, "faded": 2, "mark": 4}
    lines = [ln.split() for ln in out.splitlines()]
    lines = [ln for ln in lines if ln and want.get(ln[0]) == len(ln)]  # a line cut by the kill goes
    assert "Traceback" not in err, err
    return lines


@pytest.mark.parametrize("round_seed", [11, 22, 33])
def test_kill9_while_writing_flushing_marking_fading(tmp_path: Path, round_seed: int) -> None:
    """Fades (with compaction) between write batches; kill -9 anywhere, three times."""
    kill9_rounds(tmp_path, round_seed, "inline")


def test_kill9_while_writing_with_a_fading_thread(tmp_path: Path) -> None:
    """What `rewind serve` does: retention in its own thread while writes go on; kill -9."""
    kill9_rounds(tmp_path, 44, "thread")


def settle(states: dict[int, bytes], live: bytes, last_acked: int, seed: int, where: str) -> int:
    """The step the recovered volume stands at: after the last acknowledged batch or a later one.
    A batch in flight at the kill may be partly there: a prefix of its requests (unaligned ones are
    journaled one by one), the next request perhaps partly (an unacknowledged write may land in
    part), byte by byte either before or after it."""
    for k in range(last_acked + 3, last_acked - 1, -1):
        if states.get(k) == live:
            return k
    for k in range(last_acked, last_acked + 3):
        cur = bytearray(states[k])
        for req in random_batch(random.Random(seed * 1_000_003 + k + 1), len(live)):
            before = bytes(cur)
            apply(cur, [req])
            if all(x == y or x == z for x, y, z in zip(live, before, cur, strict=True)):
                states[k + 1] = live  # the new truth; nothing acknowledged stands at k + 1
                return k + 1
    near = [k for k, v in states.items() if v == live]
    diff = [b for b in range(len(live) // BS) if live[b * BS : (b + 1) * BS] != states[last_acked][b * BS : (b + 1) * BS]]
    raise AssertionError(f"{where}: the live volume is not the state after step {last_acked} or a later one,"
                         f" not even partly (it equals steps {near}; blocks {diff[:20]} differ)")


def kill9_rounds(tmp_path: Path, round_seed: int, mode: str) -> None:
    seed = int(os.environ.get("REWIND_STRESS_SEED", round_seed))
    print(f"REWIND_STRESS_SEED={seed}")
    rng = random.Random(seed)
    T0 = 1_800_000_000 * 10**9
    Store.create(tmp_path / "d.img", tmp_path / "st", size=CRASH_SIZE, block_size=BS,
                 clock=lambda: T0).close()
    states: dict[int, bytes] = {0: bytes(CRASH_SIZE)}  # step -> model after it
    points: dict[int, int] = {0: 0}  # seq -> step (after that step's batch)
    marks: dict[str, int] = {}  # name -> step
    step = checked = fades = 0
    for rnd in range(3):
        lines = run_child(tmp_path / "st", seed, step, rng.uniform(0.4, 1.6), mode)
        done = [int(ln[1]) for ln in lines if ln[0] == "step"]
        flushed = [int(ln[1]) for ln in lines if ln[0] == "flushed"]
        fades += sum(ln[0] == "faded" for ln in lines)
        model = bytearray(states[step])
        for k in range(step + 1, (done[-1] if done else step) + 4):
            apply(model, random_batch(random.Random(seed * 1_000_003 + k), CRASH_SIZE))
            states[k] = bytes(model)
        for ln in lines:
            if ln[0] == "step":
                points[int(ln[2])] = int(ln[1])
            elif ln[0] == "mark":
                marks[ln[1]] = int(ln[3])
        clock = Clock(T0 + (done[-1] if done else step) * 20 * 10**9)
        s = Store.open(tmp_path / "st", clock=clock)
        try:
            where = f"seed {seed} round {rnd} ({len(done)} steps, recovery {s.recovery})"
            live = s.live.read(0, CRASH_SIZE)
            last_acked = max([step, *done, *flushed])
            step = settle(states, live, last_acked, seed, where)
            assert s.at("now").read(0, CRASH_SIZE) == live, f"{where}: now differs from live"
            n = 0
            for q in retained(s):
                if q in points and points[q] <= step:
                    assert s.at(q).read(0, CRASH_SIZE) == states[points[q]], f"{where}: seq {q} (step {points[q]})"
                    n += 1
            for mk in s.marks():  # (a kill inside fade's decision can leave a mark listed but refused)
                if mk.name in marks and addressable(s, mk.seq):
                    assert s.at(f"mark:{mk.name}").read(0, CRASH_SIZE) == states[marks[mk.name]], f"{where}: {mk.name}"
            problems = s.verify().run()
            assert problems == [], f"{where}: {problems[:3]}"
            assert not list((tmp_path / "st" / "journal").glob("*.new")), where
            checked += n
        finally:
            s.close()
        for q in [q for q, k in points.items() if k > step]:
            del points[q]
    print(f"seed {seed}: {step} steps, {fades} fades seen, {checked} retained points checked, {len(marks)} marks")
    assert checked > 10 and step > 30
