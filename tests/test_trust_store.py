"""Issue 13, "trust nothing on disk": store.json, maps.db and the journal's segment files are checked
before use (invariant 6). A store.json whose block size or size was changed refuses to open, naming
store.json and the field (never serving wrong bytes); a deleted newest journal segment is reported by
open and verify and its number is never reused; a damaged maps.db is named, and `verify --repair`
rebuilds it from the journal, keeping the damaged file aside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import rewind_serve

REWIND = str(Path(sys.executable).with_name("rewind"))
MIB = 1 << 20


def run(cwd: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REWIND, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def qemu_io(uri: str, *cmds: str, readonly: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw", *(["-r"] if readonly else [])]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("rewind: note:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def edit_store_json(store: Path, drop_checksum: bool = False, **fields: object) -> None:
    """Change store.json by hand, as a person (or a bad disk) might."""
    p = store / "store.json"
    meta = json.loads(p.read_text())
    meta.update(fields)
    if drop_checksum:
        meta.pop("checksum", None)
    p.write_text(json.dumps(meta, indent=1))


@pytest.fixture
def served_history(tmp_path: Path) -> Path:
    """The issue's recipe: a 64M image, 0x11 written at 32M through NBD, mark a, 0x22 over it."""
    r = run(tmp_path, "protect", "disk.img", "--store", "s", "--size", "64M")
    assert r.returncode == 0, r.stderr
    sock = tmp_path / "nbd.sock"
    with rewind_serve(tmp_path / "s", sock):
        uri = f"nbd+unix:///?socket={sock}"
        assert qemu_io(uri, "write -P 0x11 32M 8M").returncode == 0
        assert run(tmp_path, "mark", "s", "a").returncode == 0
        assert qemu_io(uri, "write -P 0x22 32M 8M").returncode == 0
    return tmp_path


def serve_refused(cwd: Path) -> str:
    """`rewind serve` must exit 1 without ever saying ready (nothing is served)."""
    sock = cwd / "nbd2.sock"
    proc = subprocess.Popen([REWIND, "serve", "s", "--nbd", f"unix:{sock}"], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    assert proc.returncode == 1, (out, err)
    assert not out.startswith("ready"), out
    # and a past read through NBD gets an error, not wrong bytes: there is no server to read from
    r = qemu_io(f"nbd+unix:///at=mark:a?socket={sock}", "read -P 0x11 32M 8M", readonly=True)
    assert r.returncode != 0 and "read 8388608/8388608" not in r.stdout, r.stdout
    return one_line_error(subprocess.CompletedProcess([], 1, out, err))


@pytest.mark.parametrize("drop_checksum", [False, True], ids=["sealed", "old-unsealed"])
def test_wrong_block_size_in_store_json_is_refused(served_history: Path, drop_checksum: bool) -> None:
    """block_size 4096 -> 512 in store.json made the past export read 0x22 at mark a (0x11), no
    error, and verify blamed maps.db. Now serve, export and verify refuse, naming store.json and
    block_size; put back, the past export reads 0x11 through a real NBD client."""
    cwd = served_history
    edit_store_json(cwd / "s", drop_checksum=drop_checksum, block_size=512)
    msg = serve_refused(cwd)
    assert "store.json" in msg and "'block_size'" in msg and "4096" in msg, msg
    r = run(cwd, "export", "s", "--at", "mark:a", "out.img")
    assert r.returncode == 1 and not (cwd / "out.img").exists(), (r.stdout, r.stderr)
    assert "store.json" in one_line_error(r)
    r = run(cwd, "verify", "s")
    assert r.returncode == 1
    msg = one_line_error(r)
    assert "store.json" in msg and "'block_size'" in msg, msg

    edit_store_json(cwd / "s", drop_checksum=drop_checksum, block_size=4096)
    sock = cwd / "nbd3.sock"
    with rewind_serve(cwd / "s", sock):
        r = qemu_io(f"nbd+unix:///at=mark:a?socket={sock}", "read -P 0x11 32M 8M", readonly=True)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    assert "checksum" in (cwd / "s" / "store.json").read_text()  # sealed again after the check


def test_wrong_size_in_store_json_blames_store_json_not_the_primary(served_history: Path) -> None:
    """A wrong size in store.json said the primary "was resized outside Rewind; restore its size",
    and following that truncates a healthy primary. Now the message names store.json and the field;
    only a primary that really differs from a checked store.json is blamed."""
    cwd = served_history
    good = (cwd / "s" / "store.json").read_text()
    for drop in (False, True):
        edit_store_json(cwd / "s", drop_checksum=drop, size=32 * MIB)
        r = run(cwd, "log", "s")
        assert r.returncode == 1, r.stdout
        msg = one_line_error(r)
        assert "store.json" in msg and "'size'" in msg, msg
        assert "resized" not in msg and "restore its size" not in msg, msg
        (cwd / "s" / "store.json").write_text(good)
    assert (cwd / "disk.img").stat().st_size == 64 * MIB
    # the primary really resized, store.json intact: the primary is blamed
    os.truncate(cwd / "disk.img", 32 * MIB)
    r = run(cwd, "log", "s")
    assert r.returncode == 1
    msg = one_line_error(r)
    assert "disk.img" in msg and "resized outside Rewind" in msg, msg


def test_store_json_checksum(served_history: Path) -> None:
    """Any other change is caught by the checksum; an old store.json without one is checked against
    the journal and maps.db, then sealed."""
    cwd = served_history
    p = cwd / "s" / "store.json"
    good = p.read_text()
    edit_store_json(cwd / "s", mode="watch")
    r = run(cwd, "log", "s")
    assert r.returncode == 1
    msg = one_line_error(r)
    assert "store.json" in msg and "checksum" in msg, msg
    p.write_text(good)
    edit_store_json(cwd / "s", drop_checksum=True)
    r = run(cwd, "log", "s")
    assert r.returncode == 0, r.stderr
    assert "sealed" in r.stderr
    assert json.loads(p.read_text())["checksum"] == json.loads(good)["checksum"]


def _write_history(store: Path) -> int:
    """0x11 over [0, 2M), mark a, 0x55 over [5M, 6M), then in a segment of their own 0x22 over
    [2M, 2M+256K), mark b and 0x44 over it: returns that newest segment's number (mark b needs its
    0x22, which nothing else holds). Segments of 1 MiB; one write is one record."""
    from rewind.engine.journal.segments import Journal
    from rewind.engine.store import Store

    old = Journal.SEGMENT_LIMIT
    Journal.SEGMENT_LIMIT = MIB  # a real journal with small segments (256 MiB in production)
    try:
        with Store.open(store) as st:
            for off in range(0, 2 * MIB, 256 << 10):
                st.live.write(off, b"\x11" * (256 << 10))
            st.live.flush()
            st.mark("a")
            segno_a = st.journal.segno
            st.live.write(5 * MIB, b"\x55" * MIB)  # fills the segment: what follows starts a new one
            st.live.write(2 * MIB, b"\x22" * (256 << 10))
            newest = st.journal.segno
            st.mark("b")
            st.live.write(2 * MIB, b"\x44" * (256 << 10))
            st.live.flush()
            assert st.journal.segno == newest
    finally:
        Journal.SEGMENT_LIMIT = old
    assert newest > segno_a
    return newest


def test_deleted_newest_segment_is_reported_and_never_reused(tmp_path: Path) -> None:
    """Deleting the newest journal/seg-*.rwj after a clean stop went unnoticed (verify 0, open
    silent) and new writes reused its number. Now open warns and verify exits 1, both naming the
    file; mark a still exports whole; mark b, which needs the lost data, fails naming the file; new
    writes go to a new segment number."""
    assert run(tmp_path, "protect", "disk.img", "--store", "s", "--size", "8M").returncode == 0
    newest = _write_history(tmp_path / "s")
    lost = tmp_path / "s" / "journal" / f"seg-{newest:08d}.rwj"
    lost.unlink()

    r = run(tmp_path, "verify", "s")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert lost.name in r.stdout and "missing" in r.stdout, r.stdout
    assert f"warning: journal segment {lost}" in r.stderr, r.stderr

    r = run(tmp_path, "log", "s", "--json")
    assert r.returncode == 0 and lost.name in " ".join(json.loads(r.stdout)["damage"]), r.stdout
    r = run(tmp_path, "export", "s", "--at", "mark:a", "a.img")
    assert r.returncode == 0, r.stderr
    assert lost.name in r.stderr  # the warning on open
    data = (tmp_path / "a.img").read_bytes()
    assert data[: 2 * MIB] == b"\x11" * (2 * MIB) and data[2 * MIB :] == bytes(6 * MIB)
    r = run(tmp_path, "export", "s", "--at", "now", "now.img")  # the live volume: the primary holds it
    assert r.returncode == 0 and (tmp_path / "now.img").read_bytes()[2 * MIB : 2 * MIB + 4] == b"\x44" * 4

    r = run(tmp_path, "export", "s", "--at", "mark:b", "b.img")
    assert r.returncode == 1 and not (tmp_path / "b.img").exists()
    assert lost.name in r.stderr.splitlines()[-1], r.stderr

    # new writes after the loss: never into a segment with the lost one's number
    from rewind.engine.journal.segments import Journal
    from rewind.engine.store import Store

    Journal.SEGMENT_LIMIT = MIB
    try:
        with Store.open(tmp_path / "s") as st:
            for off in range(4 * MIB, 7 * MIB, 256 << 10):
                st.live.write(off, b"\x33" * (256 << 10))
            st.live.flush()
            assert st.journal.segno > newest + 1
    finally:
        Journal.SEGMENT_LIMIT = 256 << 20
    assert not lost.exists()
    r = run(tmp_path, "export", "s", "--at", "mark:a", "a2.img")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a2.img").read_bytes() == data
    r = run(tmp_path, "export", "s", "--at", "mark:b", "b.img")
    assert r.returncode == 1 and lost.name in r.stderr.splitlines()[-1], r.stderr
    r = run(tmp_path, "verify", "s")
    assert r.returncode == 1 and lost.name in r.stdout


def _damage(path: Path, how: str) -> None:
    n = path.stat().st_size
    with open(path, "r+b") as f:
        if how == "truncated":
            f.truncate(n // 2)
        elif how == "zeroed-header":
            f.write(bytes(100))
        else:  # flipped bytes in the page that holds the meta table
            f.seek(4096 + 10)
            b = f.read(64)
            f.seek(4096 + 10)
            f.write(bytes(x ^ 0xFF for x in b))


@pytest.mark.parametrize("how", ["truncated", "flipped-bytes", "zeroed-header"])
def test_damaged_maps_db_is_named_and_repaired(tmp_path: Path, how: str) -> None:
    """A damaged maps.db was "internal error: NotADBError ... report it" and serve would not start.
    Now it is named with the way out, and `verify --repair` rebuilds it from the journal, keeping
    the damaged file aside; marks and the data at them come back."""
    assert run(tmp_path, "protect", "disk.img", "--store", "s", "--size", "8M").returncode == 0
    from rewind.engine.store import Store

    with Store.open(tmp_path / "s") as st:
        for i in range(40):
            st.live.write(i * 20 * 4096, bytes([i + 1]) * (10 * 4096))
            st.live.flush()
            st.mark(f"m{i}")
    assert run(tmp_path, "export", "s", "--at", "mark:m7", "want.img").returncode == 0
    db = tmp_path / "s" / "maps.db"
    _damage(db, how)
    damaged = db.read_bytes()

    for argv in (["log", "s"], ["verify", "s"], ["serve", "s", "--nbd", f"unix:{tmp_path / 'x.sock'}"]):
        r = run(tmp_path, *argv, timeout=60)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        msg = one_line_error(r)
        assert str(db) in msg and "--repair" in msg, msg

    r = run(tmp_path, "verify", "s", "--repair")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "ok:" in r.stdout
    aside = [p for p in (tmp_path / "s").glob("maps.db.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    r = run(tmp_path, "log", "s", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["marks"]) == 40
    assert run(tmp_path, "export", "s", "--at", "mark:m7", "got.img").returncode == 0
    assert (tmp_path / "got.img").read_bytes() == (tmp_path / "want.img").read_bytes()


def test_repair_leaves_a_healthy_index_alone(tmp_path: Path) -> None:
    """--repair on a sound store changes nothing; with a segment missing it rebuilds nothing (that
    would hide the loss) and reports the damage."""
    assert run(tmp_path, "protect", "disk.img", "--store", "s", "--size", "8M").returncode == 0
    newest = _write_history(tmp_path / "s")
    r = run(tmp_path, "verify", "s", "--repair")
    assert r.returncode == 0 and not list((tmp_path / "s").glob("maps.db.damaged-*")), r.stderr
    shutil.copy(tmp_path / "s" / "maps.db", tmp_path / "maps.before")
    (tmp_path / "s" / "journal" / f"seg-{newest:08d}.rwj").unlink()
    r = run(tmp_path, "verify", "s", "--repair")
    assert r.returncode == 1 and f"seg-{newest:08d}.rwj" in r.stdout
    assert not list((tmp_path / "s").glob("maps.db.damaged-*"))


def test_repair_after_an_unclean_stop_redoes_the_primary(tmp_path: Path) -> None:
    """The redo start lives in maps.db: a rebuild alone would not re-apply to the primary the
    writes since the last checkpoint (lost with the page cache at a power cut). --repair reads it
    from the damaged file when it can, and the rebuilt store redoes them."""
    img, st = tmp_path / "disk.img", tmp_path / "s"
    assert run(tmp_path, "protect", "disk.img", "--store", "s", "--size", "1M").returncode == 0
    assert run(tmp_path, "log", "s").returncode == 0  # a checkpoint at the empty volume
    script = (
        "import os\n"
        "from rewind.engine.store import Store\n"
        f"s = Store.open({str(st)!r})\n"
        "for i in range(40):\n"
        "    s.live.write(i * 8192, bytes([i + 1]) * 4096)\n"
        "s.live.flush()\n"
        "s._index_sync()\n"
        "os._exit(0)\n"  # no close: no checkpoint
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    want = bytearray(1 << 20)
    for i in range(40):
        want[i * 8192 : i * 8192 + 4096] = bytes([i + 1]) * 4096
    img.write_bytes(bytes(1 << 20))  # power cut: the primary's unsynced writes are gone
    # the index's newest pages are damaged; its meta page is not
    import apsw

    conn = apsw.Connection(str(st / "maps.db"))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = [int(r[0]) for r in conn.execute("SELECT pageno FROM dbstat WHERE name='versions'")]
    page_size = int(conn.execute("PRAGMA page_size").fetchall()[0][0])
    conn.close()
    with open(st / "maps.db", "r+b") as f:  # the versions b-tree's page type byte: not a b-tree page
        f.seek((pages[-1] - 1) * page_size)
        f.write(b"\x00")
    r = run(tmp_path, "log", "s")
    assert r.returncode == 1 and "--repair" in r.stderr, r.stderr
    r = run(tmp_path, "verify", "s", "--repair")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "re-applied" in r.stderr and "warning" not in r.stderr, r.stderr
    assert img.read_bytes() == bytes(want)
