"""The command line: argument parsing, and issue 3's terminal session end to end with real
subprocesses (protect, serve, qemu-io writes, mark and export through the control socket while
serving, cmp against a copy taken at the mark, log, diff, then rewind after serve stops)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rewind.engine.cli import (
    build_parser,
    format_log,
    main,
    parse_args,
    parse_block_size,
    parse_nbd_address,
    parse_size,
)
from rewind.engine.errors import BadInput
from rewind.engine.progress import ProgressBar, human_bytes, human_duration

REWIND = [sys.executable, "-m", "rewind.engine"]
TRANSCRIPT = os.environ.get("REWIND_TRANSCRIPT")  # set to a file to keep the session's output

# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text,value",
    [
        ("4096", 4096),
        ("256M", 256 << 20),
        ("256m", 256 << 20),
        ("1G", 1 << 30),
        ("10GiB", 10 << 30),
        ("512K", 512 << 10),
        ("512KB", 512 << 10),
        ("2T", 2 << 40),
        ("1.5G", 3 << 29),
        ("100B", 100),
        (" 8M ", 8 << 20),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1", "0", "1.3K", "12Q", "1e6", "0x10", "1 G B", "1iB", "4096i"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(BadInput):
        parse_size(text)


@pytest.mark.parametrize("text,value", [("512", 512), ("4096", 4096), ("4K", 4096), ("1M", 1 << 20)])
def test_parse_block_size(text: str, value: int) -> None:
    assert parse_block_size(text) == value


@pytest.mark.parametrize("text", ["-4096", "3000", "0", "256", "2M", "x"])
def test_parse_block_size_rejects(text: str) -> None:
    with pytest.raises(BadInput):
        parse_block_size(text)


def test_parse_nbd_address(tmp_path: Path) -> None:
    assert parse_nbd_address(f"unix:{tmp_path}/a.sock") == f"unix:{tmp_path}/a.sock"
    assert parse_nbd_address("tcp:127.0.0.1:10809") == "tcp:127.0.0.1:10809"
    assert parse_nbd_address("tcp:[::1]:0") == "tcp:[::1]:0"
    for bad in ("foo", "unix:", "tcp:host", "tcp::80", "tcp:h:99999", "tcp:[::1:80", "unix:/no/such/dir/s"):
        with pytest.raises(BadInput):
            parse_nbd_address(bad)


def test_parser_contract() -> None:
    p = build_parser()
    a = p.parse_args(["protect", "d.img", "--store", "s", "--size", "256M", "--block-size", "8192"])
    assert (a.primary, a.store, a.size, a.block_size) == ("d.img", "s", 256 << 20, 8192)
    a = p.parse_args(["serve", "s", "--nbd", "tcp:127.0.0.1:0", "--nbd", "tcp:127.0.0.1:1", "--watch"])
    assert a.nbd == ["tcp:127.0.0.1:0", "tcp:127.0.0.1:1"] and a.watch and a.fuse is None
    a = p.parse_args(["export", "s", "--at", "mark:x", "o.img"])
    assert (a.dir, a.at, a.out) == ("s", "mark:x", "o.img")
    a = parse_args(p, ["rewind", "s", "--at", "-5m", "--yes"])
    assert a.yes and a.at == "-5m"
    a = parse_args(p, ["diff", "s", "-1h", "-30s"])
    assert (a.a, a.b) == ("-1h", "-30s")
    a = p.parse_args(["diff", "s", "mark:a", "now", "--json"])
    assert (a.a, a.b, a.json) == ("mark:a", "now", True)
    a = p.parse_args(["retention", "s", "--max-size", "10G", "--on-full", "refuse"])
    assert (a.max_size, a.on_full) == (10 << 30, "refuse")
    a = p.parse_args(["mark", "s", "before", "--freeze", "/mnt"])
    assert a.freeze == "/mnt"


def test_main_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nosuchcommand"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rewind: ") and "nosuchcommand" in err
    assert main(["--help"]) == 0
    assert "protect" in capsys.readouterr().out


def test_progress_bar_line() -> None:
    from rewind.engine.jobs import Progress

    bar = ProgressBar("export", enabled=True)
    line = bar.line(Progress("export", 50 << 20, 100 << 20, float(10 << 20)), width=80)
    assert "50.0%" in line and "10.0 MiB/s" in line and "ETA 5s" in line and len(line) < 80
    assert human_bytes(1536) == "1.5 KiB" and human_duration(125) == "2m05s"
    assert not ProgressBar("x").enabled or sys.stderr.isatty()


def test_format_log_handles_what_info_gives() -> None:
    lines = format_log({
        "store": "/s", "primary": "/d.img", "size": 1 << 20, "block_size": 4096, "records": 3,
        "journal_bytes": 12288, "horizon": {"seq": 0, "time_ns": 0}, "head": {"seq": 3, "time_ns": 10**18},
        "marks": [{"name": "m", "seq": 2, "time_ns": 10**18, "pinned": True}],
        "maps": [{"id": 1, "first_seq": 1, "last_seq": 3, "first_time": 1, "last_time": 2, "kind": "live",
                  "entries": 5}],
        "recovery": ["cut a torn journal tail"],
    })
    text = "\n".join(lines)
    for want in ("/d.img", "1.0 MiB", "seq 3", "marks (1)", "delta maps (1)", "torn", "until removed"):
        assert want in text


# ---------------------------------------------------------------- the terminal session


class Session:
    """Runs commands like a person at a terminal would, keeping a transcript."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.lines: list[str] = []

    def run(self, *argv: str, ok: int = 0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(list(argv), cwd=self.cwd, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        shown = " ".join("'" + a + "'" if " " in a else a for a in argv)
        shown = shown.replace(" ".join(REWIND), "rewind")
        self.lines.append(f"$ {shown}")
        self.lines.extend((r.stdout + r.stderr).rstrip("\n").splitlines())
        self.lines.append(f"[exit {r.returncode}]")
        assert r.returncode == ok, (argv, r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        return r

    def rewind(self, *argv: str, ok: int = 0) -> subprocess.CompletedProcess[str]:
        return self.run(*REWIND, *argv, ok=ok)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(tmp_path)
    yield s
    if TRANSCRIPT:
        Path(TRANSCRIPT).write_text("\n".join(s.lines) + "\n")


def start_serve(cwd: Path, *argv: str) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen([*REWIND, "serve", *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("ready"):
        p.kill()
        _, err = p.communicate(timeout=10)
        raise AssertionError(f"serve did not get ready: {line!r} {err}")
    return p, line.strip()


def stop_serve(p: subprocess.Popen[str]) -> tuple[int, str, str]:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise
    return p.returncode, out, err


def sparse_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) is not installed")
def test_terminal_session(session: Session, tmp_path: Path) -> None:
    """Issue 3, must-show 2."""
    sock = str(tmp_path / "r.sock")
    uri = f"nbd+unix:///?socket={sock}"
    session.rewind("protect", "disk.img", "--store", "s", "--size", "256M")
    assert (tmp_path / "disk.img").stat().st_size == 256 << 20
    serve, ready = start_serve(tmp_path, "s", "--nbd", f"unix:{sock}")
    session.lines.append(f"$ rewind serve s --nbd unix:{sock} &")
    session.lines.append(ready)
    try:
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        assert oct(os.stat(tmp_path / "s" / "control.sock").st_mode & 0o777) == "0o600"
        session.run("qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 1M 128k",
                    "-c", "write -P 0x5a 100M 1M")
        session.rewind("mark", "s", "before")  # through the control socket: serve holds the lock
        sparse_copy(tmp_path / "disk.img", tmp_path / "at-mark.img")  # the primary as it is at the mark
        session.run("qemu-io", "-f", "raw", uri, "-c", "write -P 0x11 32k 64k", "-c", "write -z 1M 64k",
                    "-c", "discard 100M 4k", "-c", "write -P 0x22 200M 8k")
        # The past point, read through NBD while serving.
        session.run("qemu-io", "-r", "-f", "raw", f"nbd+unix:///at=mark:before?socket={sock}",
                    "-c", "read -P 0xab 32k 32k", "-c", "read -P 0xcd 1M 128k", "-c", "read -P 0 200M 8k")
        session.rewind("export", "s", "--at", "mark:before", "old.img")
        session.run("cmp", "old.img", "at-mark.img")
        log = session.rewind("log", "s")
        assert "before" in log.stdout and "head:" in log.stdout and "horizon:" in log.stdout
        diff = session.rewind("diff", "s", "mark:before", "now")
        ranges = [tuple(map(int, ln.split())) for ln in diff.stdout.splitlines() if not ln.startswith("#")]
        assert ranges == [(32 << 10, 64 << 10), (1 << 20, 64 << 10), (100 << 20, 4096), (200 << 20, 8192)]
        js = json.loads(session.rewind("diff", "s", "mark:before", "now", "--json").stdout)
        assert [(r["offset"], r["length"]) for r in js] == ranges
        info = json.loads(session.rewind("log", "s", "--json").stdout)
        assert [m["name"] for m in info["marks"]] == ["before"]
        session.rewind("verify", "s")
        r = session.rewind("rewind", "s", "--at", "mark:before", "--yes", ok=2)
        assert "stop" in r.stderr
        sparse_copy(tmp_path / "disk.img", tmp_path / "at-end.img")
    finally:
        rc, out, err = stop_serve(serve)
        session.lines.append(f"[serve exit {rc}] {err.strip()}")
    assert rc == 0, err
    assert out.strip() == "", "serve prints only its ready line on stdout"
    assert not (tmp_path / "s" / "control.sock").exists()
    # Now nothing serves the store: the same commands work directly, and so does rewind.
    session.rewind("export", "s", "--at", "now", "now.img")
    session.run("cmp", "now.img", "at-end.img")
    r = session.rewind("rewind", "s", "--at", "mark:before", "--yes")
    assert "before-rewind-1" in r.stdout
    session.run("cmp", "disk.img", "at-mark.img")
    session.rewind("export", "s", "--at", "mark:before-rewind-1", "undo.img")
    session.run("cmp", "undo.img", "at-end.img")
    session.rewind("diff", "s", "mark:before", "now")
    session.rewind("log", "s")


def test_protect_and_log_without_serve(session: Session, tmp_path: Path) -> None:
    r = session.rewind("protect", "d.img", "--store", "s", "--size", "1M", "--block-size", "8192")
    assert "protecting" in r.stdout
    r = session.rewind("log", "s")
    assert "block size:    8192" in r.stdout
    session.rewind("mark", "s", "empty")
    r = session.rewind("diff", "s", "mark:empty", "now")
    assert r.stdout.startswith("# 0 ranges")
    session.rewind("verify", "s")
    r = session.rewind("retention", "s")
    assert "policy:" in r.stdout and "max size:" in r.stdout
    r = session.rewind("retention", "s", "--max-size", "512M", "--on-full", "refuse")
    assert "512.0 MiB" in r.stdout and "refuse" in r.stdout
    r = session.rewind("retention", "s", "--max-size", "none")
    assert "max size:      none" in r.stdout
    assert session.rewind("fade", "s").stdout.startswith("faded")


def test_mark_at_remove_and_log_say_how_marks_are_kept(session: Session, tmp_path: Path) -> None:
    """`rewind mark DIR NAME [--at POINT]` is a person's mark, kept until `--remove`; `log` says
    which marks are kept and which follow retention (the program's before-rewind-N); the same
    works through the control socket while serve runs."""
    session.rewind("protect", "d.img", "--store", "s", "--size", "1M")
    from rewind.engine.store import Store

    with Store.open(tmp_path / "s") as st:
        st.live.write(0, b"a" * 4096)
        st.live.write(4096, b"b" * 4096)
        st.mark("before-rewind-1")  # as a rewind makes it: the program's
    r = session.rewind("mark", "s", "first-write", "--at", "seq:1")
    assert "seq 1" in r.stdout and "kept until removed" in r.stdout
    session.rewind("mark", "s", "now-mark")
    info = json.loads(session.rewind("log", "s", "--json").stdout)
    kept = {m["name"]: (m["seq"], m["pinned"], m["kept"]) for m in info["marks"]}
    assert kept["first-write"] == (1, True, "until removed")
    assert kept["now-mark"][1:] == (True, "until removed")
    assert kept["before-rewind-1"][1:] == (False, "by retention")
    log = session.rewind("log", "s").stdout
    assert any("first-write" in ln and "until removed" in ln for ln in log.splitlines()), log
    assert any("before-rewind-1" in ln and "by retention" in ln for ln in log.splitlines()), log
    r = session.rewind("mark", "s", "now-mark", ok=2)
    assert "exists" in r.stderr and "Traceback" not in r.stderr
    r = session.rewind("mark", "s", "nope", "--remove", ok=2)
    assert "no mark named 'nope'" in r.stderr
    r = session.rewind("mark", "s", "x", "--at", "seq:999", ok=2)
    assert "outside the history" in r.stderr
    assert "removed mark now-mark" in session.rewind("mark", "s", "now-mark", "--remove").stdout
    serve, _ready = start_serve(tmp_path, "s")
    try:  # through the control socket: serve holds the lock
        session.rewind("mark", "s", "served", "--at", "mark:first-write")
        session.rewind("mark", "s", "first-write", "--remove")
        info = json.loads(session.rewind("log", "s", "--json").stdout)
        assert {m["name"]: (m["seq"], m["kept"]) for m in info["marks"]} == {
            "before-rewind-1": (kept["before-rewind-1"][0], "by retention"), "served": (1, "until removed")}
    finally:
        rc, _out, err = stop_serve(serve)
    assert rc == 0, err
    info = json.loads(session.rewind("log", "s", "--json").stdout)
    assert sorted(m["name"] for m in info["marks"]) == ["before-rewind-1", "served"]


def test_serve_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) stops serve like SIGTERM: exit 0, sockets removed, store reopenable."""
    subprocess.run([*REWIND, "protect", "d.img", "--store", "s", "--size", "1M"], cwd=tmp_path, check=True,
                   capture_output=True)
    p, ready = start_serve(tmp_path, "s")
    assert f"socket={tmp_path / 's' / 'nbd.sock'}" in ready
    assert oct(os.stat(tmp_path / "s" / "nbd.sock").st_mode & 0o777) == "0o600"
    from rewind.engine.control import RemoteStore

    with RemoteStore(tmp_path / "s") as rs:
        rs.mark("while-served")
    for argv in (["retention", "s", "--policy", "1h:all,1d:1h"], ["fade", "s"]):  # through the control socket
        r = subprocess.run([*REWIND, *argv], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    rc, out, err = stop_serve(p)
    assert rc == 0 and "Traceback" not in err, err
    assert not (tmp_path / "s" / "nbd.sock").exists() and not (tmp_path / "s" / "control.sock").exists()
    r = subprocess.run([*REWIND, "log", "s", "--json"], cwd=tmp_path, capture_output=True, text=True)
    assert [m["name"] for m in json.loads(r.stdout)["marks"]] == ["while-served"]


# ---------------------------------------------------------------- progress bar and Ctrl-C on a terminal


def _on_pty(argv: list[str], cwd: Path, interrupt_after: str | None,
            answer: tuple[str, str] | None = None) -> tuple[int, str]:
    """Run argv with stdin/stdout/stderr on a pseudo-terminal; send Ctrl-C (SIGINT) once
    `interrupt_after` appears in its output, or type answer[1] once answer[0] appears.
    Returns (exit status, everything it printed)."""
    import pty
    import select

    master, slave = pty.openpty()
    p = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    sent = False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    chunk = b""
                if not chunk and p.poll() is not None:
                    break
                out += chunk
            elif p.poll() is not None:
                break
            if interrupt_after and not sent and interrupt_after.encode() in out:
                p.send_signal(signal.SIGINT)
                sent = True
            if answer and not sent and answer[0].encode() in out:
                os.write(master, answer[1].encode())
                sent = True
        rc = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    return rc, out.decode(errors="replace")


@pytest.fixture
def big_store(tmp_path: Path) -> Path:
    r = subprocess.run([*REWIND, "protect", "big.img", "--store", "s", "--size", "16G"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return tmp_path


def test_export_shows_progress_and_ctrl_c_cancels(big_store: Path) -> None:
    rc, out = _on_pty([*REWIND, "export", "s", "--at", "now", "out.img"], big_store, interrupt_after="%")
    assert "export [" in out and "/s" in out and "ETA" in out, out
    assert rc == 130, out
    assert "cancel" in out and "Traceback" not in out, out
    assert not (big_store / "out.img").exists()
    assert not list(big_store.glob(".out.img*")), "a cancelled export left a partial file"


def test_ctrl_c_cancels_an_export_running_inside_serve(big_store: Path) -> None:
    p, _ = start_serve(big_store, "s")
    try:
        rc, out = _on_pty([*REWIND, "export", "s", "--at", "now", "out.img"], big_store, interrupt_after="%")
        assert rc == 130 and "cancel" in out and "Traceback" not in out, out
        deadline = time.monotonic() + 10
        while list(big_store.glob(".out.img*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (big_store / "out.img").exists() and not list(big_store.glob(".out.img*"))
        assert p.poll() is None
    finally:
        rc, _, err = stop_serve(p)
    assert rc == 0, err


def test_no_progress_bar_without_terminal(big_store: Path) -> None:
    subprocess.run(["truncate", "-s", "1G", str(big_store / "small.img")], check=True)
    r = subprocess.run([*REWIND, "protect", "small.img", "--store", "s2"], cwd=big_store, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*REWIND, "export", "s2", "--at", "now", "o.img"], cwd=big_store, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.startswith("exported"), r
    assert "\r" not in r.stderr and "ETA" not in r.stderr and "[" not in r.stderr, r.stderr


# ---------------------------------------------------------------- serve with the other front ends


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                    reason="FUSE is not available (/dev/fuse or fusermount3 missing)")
def test_serve_fuse(tmp_path: Path) -> None:
    """`serve --fuse MNT`: the live volume is a file there, marks appear as read-only files."""
    subprocess.run([*REWIND, "protect", "d.img", "--store", "s", "--size", "4M"], cwd=tmp_path, check=True,
                   capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p, ready = start_serve(tmp_path, "s", "--fuse", "mnt")
    try:
        assert f"fuse:{mnt}" in ready
        with open(mnt / "live.img", "r+b") as f:
            f.seek(4096)
            f.write(b"F" * 8192)
            f.flush()
            os.fsync(f.fileno())
        r = subprocess.run([*REWIND, "mark", "s", "fused"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with open(mnt / "live.img", "r+b") as f:
            f.write(b"G" * 4096)
        past = mnt / "at" / "mark:fused.img"
        assert past.read_bytes()[:12288] == bytes(4096) + b"F" * 8192
    finally:
        rc, _, err = stop_serve(p)
    assert rc == 0, err
    assert not os.path.ismount(mnt)


def test_serve_watch(tmp_path: Path) -> None:
    """`serve --watch`: changes another program makes to the primary in place are journaled."""
    subprocess.run([*REWIND, "protect", "d.img", "--store", "s", "--size", "4M"], cwd=tmp_path, check=True,
                   capture_output=True)
    p, ready = start_serve(tmp_path, "s", "--watch")
    try:
        assert "watch:" in ready
        with open(tmp_path / "d.img", "r+b") as f:
            f.seek(65536)
            f.write(b"W" * 4096)
        deadline = time.monotonic() + 15
        while True:
            r = subprocess.run([*REWIND, "diff", "s", "seq:0", "now", "--json"], cwd=tmp_path,
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            if json.loads(r.stdout):
                break
            assert time.monotonic() < deadline, "the watcher never journaled the change"
            time.sleep(0.2)
        assert json.loads(r.stdout) == [{"offset": 65536, "length": 4096}]
    finally:
        rc, _, err = stop_serve(p)
    assert rc == 0, err


@pytest.mark.parametrize("reply,rc", [("n\n", 1), ("y\n", 0)])
def test_rewind_asks_on_a_terminal(tmp_path: Path, reply: str, rc: int) -> None:
    """Without --yes on a terminal, rewind shows what will change and asks."""
    from rewind.engine.store import Store

    subprocess.run([*REWIND, "protect", "d.img", "--store", "s", "--size", "1M"], cwd=tmp_path, check=True,
                   capture_output=True)
    with Store.open(tmp_path / "s") as st:
        st.live.write(0, b"1" * 4096)
        st.mark("one")
        st.live.write(8192, b"2" * 8192)
        st.flush()
    code, out = _on_pty([*REWIND, "rewind", "s", "--at", "mark:one"], tmp_path, None, answer=("[y/N]", reply))
    assert code == rc, out
    assert "1 range, 8.0 KiB (8192 bytes) will change back to mark:one" in out and "8192 8192" in out, out
    data = (tmp_path / "d.img").read_bytes()
    assert data[8192:16384] == (bytes(8192) if rc == 0 else b"2" * 8192)
    assert ("undo with: rewind rewind s --at mark:before-rewind-1" in out) == (rc == 0), out


@pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("mkfs.ext4", "fsfreeze", "mount")),
                    reason="needs root, mkfs.ext4, fsfreeze and mount (loop) to freeze a real filesystem")
def test_mark_with_freeze(tmp_path: Path) -> None:
    """`mark --freeze MNT` freezes the filesystem around the mark (here through serve's control
    socket) and always thaws it: writes to MNT work again afterwards."""
    subprocess.run([*REWIND, "protect", "d.img", "--store", "s", "--size", "1M"], cwd=tmp_path, check=True,
                   capture_output=True)
    fs = tmp_path / "fs.img"
    subprocess.run(["truncate", "-s", "16M", str(fs)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount here: {r.stderr.strip()}")
    p = None
    try:
        p, _ = start_serve(tmp_path, "s")
        r = subprocess.run([*REWIND, "mark", "s", "frozen", "--freeze", str(mnt)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "mark frozen" in r.stdout
        # Thawed: unfreezing a filesystem that is not frozen fails (EINVAL); writes go through.
        assert subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True).returncode != 0
        (mnt / "after.txt").write_text("thawed")
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if p is not None:
            rc, _, err = stop_serve(p)
            assert rc == 0, err


# ---------------------------------------------------------------- paths from a file manager (Exec=rewind %F)


def test_desktop_entry_paths_are_accepted_or_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The .desktop entry runs `rewind %F`: a path must not be 'invalid choice'. A bad path is
    exit 2 with one line; a command name still wins over a folder named like it."""
    desktop = (Path(__file__).resolve().parents[1] / "resources" / "rewind.desktop").read_text()
    assert "Exec=rewind %F" in desktop
    monkeypatch.chdir(tmp_path)
    (tmp_path / "log").mkdir()  # a folder called like a command
    plain = tmp_path / "photos"
    plain.mkdir()
    for bad, said in ((tmp_path / "missing", "does not exist"), (plain, "without a Rewind history")):
        assert main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert said in err and "invalid choice" not in err and err.count("\n") == 1, err
    assert main(["log"]) == 2  # `rewind log` is still the log command (it wants its DIR)
    assert "DIR" in capsys.readouterr().err
    assert main(["nosuchcommand"]) == 2  # a bare word is still judged as a command
    assert "invalid choice" in capsys.readouterr().err
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    from rewind.engine.store import Store

    Store.create(tmp_path / "disk.img", tmp_path / "store", size=1 << 20).close()
    # a real history folder goes to the console (here: no display, so it says so, in one line)
    assert main([str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert "no display to open the console on" in err and err.count("\n") == 1, err
