"""Bad input to the command line: every error case of the CLI contract exits 2 with exactly one line
on stderr (no traceback) and leaves the store byte for byte as it was. Run against a store opened
directly and, for the commands that work beside `rewind serve`, through its control socket."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REWIND = [sys.executable, "-m", "rewind.engine"]
# The lock file holds the pid of whoever opened the store last: not store contents.
VOLATILE = {"lock"}


def run(*args: str, cwd: Path, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REWIND, *args], cwd=cwd, capture_output=True, text=True, stdin=stdin, timeout=60)


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under root (but the lock) with its sha256: equal before and after = untouched."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in VOLATILE and not p.is_socket():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store `s` for disk.img with a mark `m1` and some history, made through the CLI."""
    from rewind.engine.store import Store

    d = tmp_path_factory.mktemp("badinput")
    r = run("protect", "disk.img", "--store", "s", "--size", "1M", cwd=d)
    assert r.returncode == 0, r.stderr
    with Store.open(d / "s") as st:
        st.live.write(0, b"a" * 8192)
        st.live.flush()
        st.mark("m1")
        st.live.write(4096, b"b" * 4096)
        st.live.flush()
    (d / "plain").mkdir()
    (d / "existing.img").write_bytes(b"x")
    (d / "afile").write_text("not a dir")
    return d


# (argv, what the message must mention); the store dir is `s`, cwd the work dir.
CASES: list[tuple[list[str], str]] = [
    # protect
    (["protect", "new.img", "--store", "nodir/sub/s2", "--size", "1M"], "does not exist"),
    (["protect", "disk.img", "--store", "s"], "already"),
    (["protect", "new.img", "--store", "s2", "--size", "12Q"], "size"),
    (["protect", "new.img", "--store", "s2", "--size", "-5"], "size"),
    (["protect", "new.img", "--store", "s2", "--size", "0"], "size"),
    (["protect", "new.img", "--store", "s2", "--size", ""], "size"),
    (["protect", "new.img", "--store", "s2", "--size", "1.3K"], "size"),
    (["protect", "missing.img", "--store", "s2"], "--size"),
    (["protect", "new.img", "--store", "s2", "--size", "1M", "--block-size", "-4096"], "block size"),
    (["protect", "new.img", "--store", "s2", "--size", "1M", "--block-size", "3000"], "block size"),
    (["protect", "new.img", "--store", "s2", "--size", "1M", "--block-size", "0"], "block size"),
    (["protect", "new.img", "--store", "s2", "--size", "1M", "--block-size", "256"], "block size"),
    (["protect", "new.img", "--store", "s2", "--size", "1M", "--block-size", "4M"], "block size"),
    (["protect", "plain", "--store", "s2"], "directory"),
    (["protect", "new.img"], "--store"),
    # missing / non-store DIR
    (["log", "nosuch"], "no such directory"),
    (["log", "afile"], "not a directory"),
    (["log", "plain"], "not a Rewind store"),
    (["export", "plain", "--at", "now", "out.img"], "not a Rewind store"),
    (["verify", "nosuch"], "no such directory"),
    (["mark", "nosuch", "x"], "no such directory"),
    (["diff", "plain", "now", "now"], "not a Rewind store"),
    (["serve", "nosuch"], "no such directory"),
    (["serve", "plain"], "not a Rewind store"),
    (["rewind", "plain", "--at", "now", "--yes"], "not a Rewind store"),
    # POINT forms
    (["export", "s", "--at", "yesterday", "out.img"], "yesterday"),
    (["export", "s", "--at", "seq:abc", "out.img"], "seq:abc"),
    (["export", "s", "--at", "seq:-3", "out.img"], "seq:-3"),
    (["export", "s", "--at", "mark:", "out.img"], "mark"),
    (["export", "s", "--at", "-5x", "out.img"], "-5x"),
    (["export", "s", "--at", "2026-13-45T99:00", "out.img"], "2026-13-45T99:00"),
    (["diff", "s", "bogus", "now"], "bogus"),
    (["diff", "s", "now", "seq:"], "seq:"),
    # unknown mark, seq beyond head, time before the horizon
    (["export", "s", "--at", "mark:nope", "out.img"], "nope"),
    (["diff", "s", "mark:nope", "now"], "nope"),
    (["export", "s", "--at", "seq:999999", "out.img"], "999999"),
    (["diff", "s", "seq:0", "seq:999999"], "999999"),
    (["export", "s", "--at", "1999-01-01T00:00:00", "out.img"], "1999"),
    (["rewind", "s", "--at", "mark:nope", "--yes"], "nope"),
    # OUT
    (["export", "s", "--at", "now", "nodir/out.img"], "does not exist"),
    (["export", "s", "--at", "now", "existing.img"], "exists"),
    (["export", "s", "--at", "now", "plain"], "exists"),
    (["export", "s", "--at", "now", "s/inside.img"], "store"),
    # mark
    (["mark", "s", "m1"], "m1"),
    (["mark", "s", ""], "mark"),
    (["mark", "s", "x", "--freeze", "plain"], "mount point"),
    (["mark", "s", "x", "--freeze", "nosuchmnt"], "nosuchmnt"),
    # rewind without --yes and without a terminal
    (["rewind", "s", "--at", "mark:m1"], "--yes"),
    # serve options
    (["serve", "s", "--nbd", "foo:bar"], "--nbd"),
    (["serve", "s", "--nbd", "tcp:localhost:notaport"], "--nbd"),
    (["serve", "s", "--nbd", "tcp:localhost:70000"], "--nbd"),
    (["serve", "s", "--nbd", "unix:/nonexistent-dir/x.sock"], "does not exist"),
    (["serve", "s", "--fuse", "nosuchmnt"], "--fuse"),
    # retention
    (["retention", "s", "--on-full", "explode"], "on-full"),
    (["retention", "s", "--max-size", "lots"], "size"),
    (["retention", "s", "--policy", "sometimes"], "sometimes"),
    (["retention", "s", "--policy", "24h:all", "--max-size", "-1G"], "size"),
    # usage
    (["frobnicate", "s"], "frobnicate"),
    (["log", "s", "--frob"], "--frob"),
    (["export", "s", "out.img"], "--at"),
    (["mark", "s"], "NAME"),
    (["diff", "s", "now"], "TO"),
    (["log"], "DIR"),
    (["log", "s", "extra"], "extra"),
]


def check_bad(r: subprocess.CompletedProcess[str], must_mention: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stderr.endswith("\n")
    assert lines[0].startswith("rewind: ")
    assert must_mention.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("argv,mention", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input(work: Path, argv: list[str], mention: str) -> None:
    before = tree_hash(work / "s")
    listing = sorted(p.name for p in work.iterdir())
    r = run(*argv, cwd=work)
    check_bad(r, mention)
    assert tree_hash(work / "s") == before, "bad input changed the store"
    assert sorted(p.name for p in work.iterdir()) == listing, "bad input left files behind"
    assert (work / "existing.img").read_bytes() == b"x"


def test_help_is_not_an_error(work: Path) -> None:
    r = run("--help", cwd=work)
    assert r.returncode == 0 and "protect" in r.stdout and r.stderr == ""
    r = run("export", "--help", cwd=work)
    assert r.returncode == 0 and "POINT" in r.stdout


# ---------------------------------------------------------------- the same, while serve runs


@pytest.fixture(scope="module")
def served(work: Path) -> Iterator[Path]:
    """`rewind serve s` running (the store is locked: commands go through the control socket)."""
    p = subprocess.Popen([*REWIND, "serve", "s"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("ready"), (line, p.stderr.read() if p.poll() is not None else "")
        yield work
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise
        assert rc == 0, p.stderr.read() if p.stderr else ""


SERVED_CASES: list[tuple[list[str], str]] = [
    (["export", "s", "--at", "yesterday", "out.img"], "yesterday"),
    (["export", "s", "--at", "mark:nope", "out.img"], "nope"),
    (["export", "s", "--at", "seq:999999", "out.img"], "999999"),
    (["export", "s", "--at", "now", "nodir/out.img"], "does not exist"),
    (["export", "s", "--at", "now", "existing.img"], "exists"),
    (["export", "s", "--at", "now", "s/inside.img"], "store"),
    (["diff", "s", "mark:nope", "now"], "nope"),
    (["mark", "s", "m1"], "m1"),
    (["rewind", "s", "--at", "mark:m1", "--yes"], "stop"),
    (["retention", "s", "--policy", "sometimes"], "sometimes"),
    (["serve", "s"], "in use"),
]


@pytest.mark.parametrize("argv,mention", SERVED_CASES, ids=[" ".join(c[0]) for c in SERVED_CASES])
def test_bad_input_while_served(served: Path, argv: list[str], mention: str) -> None:
    work = served
    before = tree_hash(work / "s")
    listing = sorted(p.name for p in work.iterdir())
    r = run(*argv, cwd=work)
    if argv[0] == "serve":
        # A second serve on a held store is not bad input but a busy store: exit 1, one line.
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and mention in r.stderr, r.stderr
    else:
        check_bad(r, mention)
    assert tree_hash(work / "s") == before
    assert sorted(p.name for p in work.iterdir()) == listing


def test_console_without_gui_extras_is_one_line(tmp_path: Path) -> None:
    """`rewind` alone opens the console; when the GUI cannot be imported it says what to install."""
    shadow = tmp_path / "shadow"
    (shadow / "PySide6").mkdir(parents=True)
    (shadow / "PySide6" / "__init__.py").write_text("raise ImportError('No module named PySide6 (test)')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow), QT_QPA_PLATFORM="offscreen")
    r = subprocess.run(REWIND, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    if r.returncode != 2:
        pytest.skip(f"the console did not need PySide6 at import time (exit {r.returncode})")
    assert len(r.stderr.splitlines()) == 1 and "gui" in r.stderr.lower() and "Traceback" not in r.stderr


def test_serve_on_a_busy_port_is_bad_input(tmp_path: Path) -> None:
    """A front end that cannot start: one line, exit 2, nothing left running or behind."""
    import socket

    from rewind.engine.store import Store

    work = tmp_path
    assert run("protect", "d.img", "--store", "s", "--size", "1M", cwd=work).returncode == 0
    with Store.open(work / "s") as st:  # some history, as in a store people serve
        st.live.write(0, b"x" * 4096)

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        before = tree_hash(work / "s")
        r = run("serve", "s", "--nbd", f"tcp:127.0.0.1:{port}", cwd=work)
        check_bad(r, str(port))
        assert r.stdout == ""
        assert not (work / "s" / "control.sock").exists()
        assert tree_hash(work / "s") == before
    finally:
        busy.close()


def test_console_without_a_display_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    r = subprocess.run(REWIND, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "display" in r.stderr, r.stderr
