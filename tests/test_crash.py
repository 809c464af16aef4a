"""Crash safety of `rewind serve`: a real serve subprocess takes writes (with flushes) from an NBD
client and marks through the control socket, and is SIGKILLed at random moments, several times.
After each restart every flushed write is there, what survived past the last flush is a prefix of
the later writes (order), the live volume holds nothing that was never
written, `now` reads like the live volume, and every mark reads exactly what a plain model says.
A torn last record (the last segment cut mid-record after a kill) is cut and reported, not served.

Reproduce a run with REWIND_CRASH_SEED=<seed printed on failure>."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rewind.engine.control import RemoteStore
from rewind.engine.frontends.nbd.protocol import NbdClient

REWIND = [sys.executable, "-m", "rewind.engine"]
VOL = 1 << 20
SECTOR = 512
ROUNDS = 4
MAX_MARKS_PER_ROUND = 25


@dataclass
class Model:
    """The volume as a plain byte array, plus what may or may not have survived a crash."""

    current: bytearray = field(default_factory=lambda: bytearray(VOL))  # every acknowledged write applied
    flushed: bytearray = field(default_factory=lambda: bytearray(VOL))  # as of the last acknowledged flush
    since_flush: list[tuple[int, bytes]] = field(default_factory=list)  # sent after it (acked or in flight)
    marks: dict[str, bytes] = field(default_factory=dict)  # acknowledged marks -> volume at the mark

    def allowed(self, sector: int) -> set[bytes]:
        lo = sector * SECTOR
        out = {bytes(self.flushed[lo : lo + SECTOR])}
        for off, data in self.since_flush:
            if off <= lo < off + len(data):
                out.add(data[lo - off : lo - off + SECTOR])
        return out


def pattern(wid: int, off: int, n: int) -> bytes:
    """Data no other write produces: (write id, sector) stamped over each sector."""
    return b"".join(struct.pack("<QQ", wid, (off + i) // SECTOR) * (SECTOR // 16) for i in range(0, n, SECTOR))


class Serve:
    def __init__(self, cwd: Path) -> None:
        self.p = subprocess.Popen([*REWIND, "serve", "s"], cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line.startswith("ready"):
            self.p.kill()
            raise AssertionError(f"serve did not start: {line!r} {self.p.communicate(timeout=10)[1]}")
        self.addr = f"unix:{cwd / 's' / 'nbd.sock'}"

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)
        self.p.communicate(timeout=10)

    def stop(self) -> str:
        self.p.send_signal(signal.SIGTERM)
        _, err = self.p.communicate(timeout=30)
        assert self.p.returncode == 0, err
        return err


def read_all(addr: str, export: str) -> bytes:
    with NbdClient.connect(addr, export) as c:
        assert c.size == VOL
        return b"".join(c.read(off, 256 << 10) for off in range(0, VOL, 256 << 10))


def check_after_restart(serve: Serve, model: Model, seed: int, rnd: int) -> None:
    live = read_all(serve.addr, "")
    for sector in range(VOL // SECTOR):
        got = live[sector * SECTOR : (sector + 1) * SECTOR]
        if got not in model.allowed(sector):
            raise AssertionError(
                f"seed {seed} round {rnd}: sector {sector} (offset {sector * SECTOR}) holds data that is "
                f"neither the flushed contents nor any later write: {got[:16].hex()}"
            )
    # Order: what survived past the last flush is a prefix of the writes sent after it, never a
    # later write without an earlier one.
    state = bytearray(model.flushed)
    prefixes = [bytes(state)]
    for off, data in model.since_flush:
        state[off : off + len(data)] = data
        prefixes.append(bytes(state))
    assert live in prefixes, (
        f"seed {seed} round {rnd}: the live volume is not the flushed state plus a prefix of the "
        f"{len(model.since_flush)} later writes"
    )
    assert read_all(serve.addr, "at=now") == live, f"seed {seed} round {rnd}: 'now' differs from the live volume"
    for name, snap in model.marks.items():
        got = read_all(serve.addr, f"at=mark:{name}")
        if got != snap:
            bad = next(i for i in range(VOL) if got[i] != snap[i])
            raise AssertionError(f"seed {seed} round {rnd}: mark {name} differs from the model at offset {bad}")
    # What survived is the new truth.
    model.current[:] = live
    model.flushed[:] = live
    model.since_flush.clear()


def drive(serve: Serve, cwd: Path, model: Model, rng: random.Random, rnd: int, wid: list[int],
          kill_after: float | None) -> None:
    """Writes, zeroes, trims, flushes and marks until the serve dies (or, without a kill, a while)."""
    if kill_after is not None:
        killer = threading.Timer(kill_after, serve.p.send_signal, args=(signal.SIGKILL,))
        killer.start()
    deadline = time.monotonic() + (kill_after or 0.5) + 5
    marks = 0
    try:
        client = NbdClient.connect(serve.addr, "", timeout=10)
        remote = RemoteStore(cwd / "s")
    except Exception:
        return  # killed before we even connected
    try:
        while time.monotonic() < deadline:
            for _ in range(rng.randint(1, 8)):
                off = rng.randrange(0, VOL // SECTOR) * SECTOR
                n = min(rng.randint(1, 64) * SECTOR, VOL - off)
                kind = rng.random()
                data = bytes(n) if kind < 0.15 else pattern(wid[0], off, n)
                wid[0] += 1
                model.since_flush.append((off, data))
                if kind < 0.08:
                    client.zero(off, n)
                elif kind < 0.15:
                    client.trim(off, n)
                else:
                    client.write(off, data, fua=rng.random() < 0.05)
                model.current[off : off + n] = data
            client.flush()
            model.flushed[:] = model.current
            model.since_flush.clear()
            if marks < MAX_MARKS_PER_ROUND and rng.random() < 0.5:
                name = f"r{rnd}-{marks}"
                remote.mark(name)
                model.marks[name] = bytes(model.current)
                marks += 1
            if kill_after is None and time.monotonic() > deadline - 5:
                break
    except Exception:
        if kill_after is None:
            raise
    finally:
        client.close()
        remote.close()
        if kill_after is not None:
            killer.join()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    r = subprocess.run([*REWIND, "protect", "disk.img", "--store", "s", "--size", str(VOL)], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return tmp_path


def test_kill_during_writes(work: Path) -> None:
    seed = int(os.environ.get("REWIND_CRASH_SEED", random.randrange(1 << 30)))
    print(f"REWIND_CRASH_SEED={seed}")
    rng = random.Random(seed)
    model = Model()
    wid = [1]
    for rnd in range(ROUNDS):
        serve = Serve(work)
        try:
            if rnd:
                check_after_restart(serve, model, seed, rnd)
            drive(serve, work, model, rng, rnd, wid, kill_after=rng.uniform(0.2, 1.2))
        finally:
            serve.kill()
    serve = Serve(work)
    try:
        check_after_restart(serve, model, seed, ROUNDS)
        r = subprocess.run([*REWIND, "verify", "s"], cwd=work, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (seed, r.stdout, r.stderr)
    finally:
        serve.stop()
    assert len(model.marks) > 0


def test_torn_last_record_is_cut_and_reported(work: Path) -> None:
    """A write acknowledged but never flushed, whose journal record is torn by the crash: on restart
    the tail is cut and reported, and no point serves the torn write."""
    rng = random.Random(7)
    model = Model()
    wid = [1]
    serve = Serve(work)
    try:
        drive(serve, work, model, rng, 0, wid, kill_after=None)
        with RemoteStore(work / "s") as rs:
            rs.mark("last-good")
        model.marks["last-good"] = bytes(model.current)
        off, n = 256 << 10, 64 << 10
        before = bytes(model.current[off : off + n])
        with NbdClient.connect(serve.addr, "") as c:
            c.write(off, pattern(999_999, off, n))  # acknowledged, not flushed
    finally:
        serve.kill()
    segs = sorted((work / "s" / "journal").glob("seg-*"))
    assert segs, "no journal segments"
    last = segs[-1]
    size = last.stat().st_size
    os.truncate(last, size - 1000)  # mid-record: the torn write's record is 64 KiB + header
    # A torn append never reached the primary (the journal is written first): make the image say so.
    fd = os.open(work / "disk.img", os.O_WRONLY)
    try:
        os.pwrite(fd, before, off)
    finally:
        os.close(fd)
    serve = Serve(work)
    try:
        check_after_restart(serve, model, 7, 1)
        now = read_all(serve.addr, "at=now")
        assert now[off : off + n] == before, "the torn write was served"
    finally:
        err = serve.stop()
    assert "torn" in err and "note:" in err, err
    assert all(len(line) < 400 for line in err.splitlines())
