"""Issue 13, "trust nothing on the wire or on disk": files Rewind makes are private and never
written through a name someone else planted; bad or future points are bad input (exit 2, one line),
not internal errors and not silently "now". Real CLI (.venv/bin/rewind), real qemu-io/nbdinfo."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pwd
import random
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import rewind_serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refmodel import Clock
from rewind.engine import control
from rewind.engine.errors import BadInput, PointError
from rewind.engine.points import parse_point
from rewind.engine.store import Store

REWIND = Path(sys.executable).with_name("rewind")
NOW = 1_800_000_000 * 10**9


def _umask022() -> None:
    os.umask(0o022)  # the usual default: files come out 0644 unless the code asks for less


def rw(*args: str, cwd: Path, check: int | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(REWIND), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, preexec_fn=_umask022)
    if check is not None:
        assert r.returncode == check, (args, r.returncode, r.stdout, r.stderr)
    return r


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 and exactly one line on stderr, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return lines[0]


def modes(d: Path) -> dict[str, int]:
    """Permission bits of d and everything under it (not following links)."""
    out = {".": stat.S_IMODE(os.lstat(d).st_mode)}
    for p in sorted(d.rglob("*")):
        out[str(p.relative_to(d))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def assert_private(d: Path) -> None:
    """Directories 0700, every other file 0600 (sockets included)."""
    bad = {}
    for name, m in modes(d).items():
        want = 0o700 if (d / name).is_dir() else 0o600
        if m != want:
            bad[name] = oct(m)
    assert not bad, f"not private in {d}: {bad}"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A store `s` protecting disk.img (made by protect --size) with one write and a mark."""
    rw("protect", "disk.img", "--store", "s", "--size", "1M", cwd=tmp_path, check=0)
    with Store.open(tmp_path / "s") as s:
        s.live.write(0, b"A" * 8192)
        s.live.flush()
        s.mark("m1")
    return tmp_path


def nobody() -> int:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand files to another user")
    return pwd.getpwnam("nobody").pw_uid


# ------------------------------------------------------------------ 4: planted symlinks


def test_export_does_not_follow_a_planted_symlink(work: Path) -> None:
    """Another user plants `.OUT.rewind-partial` -> a root-only file in a sticky directory."""
    uid = nobody()
    sticky = work / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    victim = work / "victim"
    victim.write_bytes(b"root's secret, must stay")
    os.chmod(victim, 0o600)
    link = sticky / ".out.img.rewind-partial"  # the name the export used to write through
    link.symlink_to(victim)
    os.lchown(link, uid, uid)
    r = rw("export", "s", "--at", "mark:m1", str(sticky / "out.img"), cwd=work)
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"root's secret, must stay"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert link.is_symlink() and os.readlink(link) == str(victim)
    out = sticky / "out.img"
    assert not out.is_symlink() and out.read_bytes()[:8192] == b"A" * 8192
    assert sorted(p.name for p in sticky.iterdir()) == [".out.img.rewind-partial", "out.img"]


def test_export_over_a_planted_dangling_link_to_the_real_name(work: Path) -> None:
    """Even a planted link whose target does not exist yet is not written through (no file appears)."""
    d = work / "out"
    d.mkdir()
    target = work / "created-through-link"
    (d / ".x.img.rewind-partial").symlink_to(target)
    rw("export", "s", "--at", "now", str(d / "x.img"), cwd=work, check=0)
    assert not target.exists()


# ------------------------------------------------------------------ 5: private data


def test_protect_size_makes_everything_private(work: Path) -> None:
    assert stat.S_IMODE((work / "disk.img").stat().st_mode) == 0o600
    assert_private(work / "s")


def test_export_is_private(work: Path) -> None:
    os.chmod(work / "disk.img", 0o644)  # even from a world-readable primary: it is the volume's data
    rw("export", "s", "--at", "mark:m1", "old.img", cwd=work, check=0)
    assert stat.S_IMODE((work / "old.img").stat().st_mode) == 0o600


def test_store_private_while_served_and_written(work: Path) -> None:
    """maps.db-wal/-shm, the control socket, new segments: all private while serve runs."""
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io not installed")
    sock = work / "nbd.sock"
    old = os.umask(0o022)
    try:
        with rewind_serve(work / "s", sock):
            for i in range(20):
                r = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {i} {i * 4096} 4096",
                                    f"nbd+unix:///?socket={sock}"], capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stderr
            rw("mark", "s", "m2", cwd=work, check=0)
            names = set(modes(work / "s"))
            assert {"maps.db-wal", "maps.db-shm", "control.sock", "store.json"} <= names, names
            assert_private(work / "s")
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert_private(work / "s")


def test_protect_makes_an_existing_empty_store_dir_private(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir(mode=0o755)
    os.chmod(tmp_path / "s", 0o755)
    r = rw("protect", "disk.img", "--store", "s", "--size", "1M", cwd=tmp_path, check=0)
    assert "private" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert_private(tmp_path / "s")


def test_protect_refuses_an_empty_dir_owned_by_another_user(tmp_path: Path) -> None:
    uid = nobody()
    d = tmp_path / "s"
    d.mkdir()
    os.chmod(d, 0o777)
    os.chown(d, uid, uid)
    line = one_line_error(rw("protect", "disk.img", "--store", "s", "--size", "1M", cwd=tmp_path))
    assert "another user" in line
    assert list(d.iterdir()) == [] and not (tmp_path / "disk.img").exists()


def test_opening_a_loose_store_tightens_it(work: Path) -> None:
    """A store made by an older version (or chmod-ed since): made private again, and said so."""
    s = work / "s"
    os.chmod(s, 0o755)
    os.chmod(s / "journal", 0o755)
    for p in (s / "store.json", s / "maps.db", *(s / "journal").iterdir()):
        os.chmod(p, 0o644)
    r = rw("log", "s", cwd=work, check=0)
    assert "private" in r.stderr, r.stderr
    assert_private(s)


def test_fade_compaction_writes_private_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compacted segment is a new file (seg.new renamed over): it must be 0600 like the rest."""
    from rewind.engine.journal.segments import Journal

    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 16 << 10)
    old = os.umask(0o022)
    clock = Clock()
    try:
        s = Store.create(tmp_path / "d.img", tmp_path / "st", size=512 * 32, block_size=512, clock=clock)
        s.set_retention(policy="1h:all,1d:1h")  # as test_retention's kill -9 test, which compacts
        rnd = random.Random(5)
        for _ in range(1500):
            s.live.write(rnd.randrange(32) * 512, rnd.randbytes(512))
            clock.advance(120)
        s.flush()
        before = {p.name: p.stat().st_ino for p in (tmp_path / "st" / "journal").iterdir()}
        s.fade().run()
        after = {p.name: p.stat().st_ino for p in (tmp_path / "st" / "journal").iterdir()}
        assert any(before.get(n) not in (None, ino) for n, ino in after.items()), "no segment was compacted"
        assert_private(tmp_path / "st")
        s.close()
    finally:
        os.umask(old)


# ------------------------------------------------------------------ 11: bad points


@pytest.mark.parametrize("point", ["0001-01-01T00:00:00", "-" + "9" * 400 + "d", "0001-01-01T00:00:00+14:00",
                                   "-1e5d", "seq:" + "9" * 5000, "mark:\udcff"])
def test_bad_points_are_bad_input(work: Path, point: str) -> None:
    for args in (["export", "s", "--at", point, "o.img"], ["diff", "s", point, "now"]):
        env = dict(os.environ)
        r = subprocess.run([str(REWIND), *args], cwd=work, capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL, env=env)
        res = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode(errors="replace"))
        one_line_error(res)
    assert not (work / "o.img").exists()


def test_control_stats_with_huge_since_is_an_error_reply(work: Path) -> None:
    with rewind_serve(work / "s", work / "nbd.sock"):
        conn = control.Connection(work / "s")
        try:
            for args in ({"since": 10**30}, {"until": 10**30}, {"since": 2**63}):
                conn.send({"op": "stats", "args": args})
                reply = conn.receive()
                assert reply["ok"] is False and reply["exit_code"] == 2, reply
                assert "internal" not in str(reply["message"])
            conn.send({"op": "stats", "args": {"since": 0}})
            assert conn.receive()["ok"] is True  # the connection and serve live on
        finally:
            conn.close()


ANY_TEXT = st.text(st.characters(exclude_categories=()))  # surrogates too: what argv holds for non-UTF-8 bytes
POINTISH = st.one_of(
    ANY_TEXT,
    st.integers(0, 10**500).map(lambda n: f"-{n}d"),
    st.builds(lambda a, b, u: f"-{a}.{b}{u}", st.integers(0, 10**40), st.integers(0, 10**40), st.sampled_from("smhdw")),
    st.datetimes().map(lambda t: t.isoformat()),
    st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()),
    ANY_TEXT.map(lambda t: "mark:" + t),
    st.integers().map(lambda n: f"seq:{n}"),
)


@settings(max_examples=3000, deadline=None)
@given(POINTISH)
def test_fuzz_parse_point_never_crashes(text: str) -> None:
    try:
        p = parse_point(text, NOW)
    except PointError as e:
        assert "\n" not in str(e)
        return
    assert p.kind in ("now", "time", "seq", "mark")


@settings(max_examples=1500, deadline=None)
@given(st.from_regex(r"\A(-[0-9]{1,500}(\.[0-9]{0,40})?[smhdw]|[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}"
                     r"(T[0-9]{1,2}:[0-9]{1,2}(:[0-9]{1,2}(\.[0-9]{1,9})?)?([+-][0-9]{2}:[0-9]{2}|Z)?)?)\Z"))
def test_fuzz_parse_point_times(text: str) -> None:
    """Shaped like relative and ISO times, so the fuzzing reaches the arithmetic."""
    try:
        parse_point(text, NOW)
    except PointError:
        pass


def test_fuzz_resolve_on_a_real_store(tmp_path: Path) -> None:
    clock = Clock(NOW)
    with Store.create(tmp_path / "d.img", tmp_path / "st", size=64 << 10, clock=clock) as s:
        s.live.write(0, b"x" * 4096)
        clock.advance(10)
        s.mark("m")

        @settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
        @given(POINTISH)
        def check(text: str) -> None:
            try:
                seq = s.resolve(text)
            except BadInput:  # PointError included
                return
            assert 0 <= seq <= s.head

        check()


# ------------------------------------------------------------------ 12: future times


def test_resolve_future_and_idle_times() -> None:
    """Engine rule with a hand-moved clock: between the newest write and now is the newest point;
    beyond now (plus 2 s of skew) is refused, naming the newest point."""
    import tempfile

    clock = Clock(NOW)
    with tempfile.TemporaryDirectory() as d, Store.create(Path(d) / "d.img", Path(d) / "st",
                                                          size=64 << 10, clock=clock) as s:
        s.live.write(0, b"x" * 4096)
        s.flush()
        head = s.head
        clock.advance(3600)  # an idle hour
        iso = lambda ns: dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat()  # noqa: E731
        for ok in ("now", "-5m", "-0s", iso(NOW + 60 * 10**9), iso(clock()), iso(clock() + 10**9)):
            assert s.resolve(ok) == head, ok
        for bad in (iso(clock() + 3 * 10**9), iso(clock() + 86400 * 10**9), "9999-12-31T23:59:59-14:00"):
            with pytest.raises(PointError, match=f"future.*newest point is seq:{head}"):
                s.resolve(bad)


def _local_iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t).isoformat(timespec="milliseconds")


def test_export_refuses_a_future_time(work: Path) -> None:
    tomorrow = _local_iso(time.time() + 86400)
    line = one_line_error(rw("export", "s", "--at", tomorrow, "o.img", cwd=work))
    assert "future" in line and "newest point is seq:" in line
    assert not (work / "o.img").exists()
    # The present and the idle time since the last write are the newest state.
    time.sleep(1.1)
    for at in ("now", "-0s", _local_iso(time.time() - 0.5), _local_iso(time.time())):
        rw("export", "s", "--at", at, "o.img", cwd=work, check=0)
        assert (work / "o.img").read_bytes()[:8192] == b"A" * 8192
        (work / "o.img").unlink()


@contextlib.contextmanager
def _served(work: Path) -> Iterator[Path]:
    for tool in ("qemu-io", "nbdinfo"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    sock = work / "nbd.sock"
    with rewind_serve(work / "s", sock):
        yield sock


def test_nbd_refuses_a_future_point(work: Path) -> None:
    with _served(work) as sock:
        for at in ("9999-12-31T23:59:59-14:00", _local_iso(time.time() + 86400)):
            uri = f"nbd+unix:///at={at}?socket={sock}"
            r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4096", uri],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "future" in r.stderr, r.stderr
            r = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=60)
            assert r.returncode != 0, r.stdout
        # A time just past, with no write since: the newest state, served.
        uri = f"nbd+unix:///at={_local_iso(time.time())}?socket={sock}"
        r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 65 0 8192", uri],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr


def test_write_replace_for_the_console_save_is_private_and_ignores_planted_names(tmp_path: Path) -> None:
    """The console's "save file as it was" writes through safefile.write_replace (it used a fixed
    `.DEST.rewind-partial` name too)."""
    from rewind.engine.safefile import write_replace

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / ".saved.txt.rewind-partial").symlink_to(victim)
    old = os.umask(0o022)
    try:
        write_replace(tmp_path / "saved.txt", b"old contents")
    finally:
        os.umask(old)
    assert victim.read_bytes() == b"keep"
    assert (tmp_path / "saved.txt").read_bytes() == b"old contents"
    assert stat.S_IMODE((tmp_path / "saved.txt").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [".saved.txt.rewind-partial", "saved.txt", "victim"]
