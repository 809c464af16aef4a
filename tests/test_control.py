"""Control socket: framing, caps and field checks on both sides, and a real serve store reached
through RemoteStore (the console's way to attach to a running `rewind serve`)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from rewind.engine import control
from rewind.engine.control import (
    ControlServer,
    LineReader,
    ProtocolError,
    RemoteStore,
    decode,
    encode,
    error_from_json,
    error_to_json,
    progress_from_json,
)
from rewind.engine.errors import BadInput, CorruptionError, PointError, RewindError
from rewind.engine.jobs import Progress

# ---------------------------------------------------------------- framing (no store needed)


def test_encode_is_one_line_and_round_trips() -> None:
    msg = {"op": "mark", "args": {"name": "a\nb \u00e9"}}
    line = encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line[:-1]) == msg


@pytest.mark.parametrize("line", [b"", b"[1,2]", b"{bad json", b"\xff\xfe", b'"text"'])
def test_decode_rejects_non_objects(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(line)


def test_line_reader_caps_message_size() -> None:
    a, b = socket.socketpair()
    try:
        reader = LineReader(b, limit=1000)
        a.sendall(b"x" * 2000)
        with pytest.raises(ProtocolError):
            reader.readline()
    finally:
        a.close()
        b.close()


def test_line_reader_splits_lines_and_sees_eof() -> None:
    a, b = socket.socketpair()
    try:
        reader = LineReader(b, limit=1000)
        a.sendall(b'{"a":1}\n{"b"')
        assert reader.readline() == b'{"a":1}'
        assert reader.poll() is None
        a.sendall(b":2}\n")
        assert reader.readline() == b'{"b":2}'
        a.close()
        assert reader.readline() is None
    finally:
        b.close()


def test_line_reader_rejects_truncated_message_at_eof() -> None:
    a, b = socket.socketpair()
    reader = LineReader(b, limit=1000)
    a.sendall(b'{"a":')
    a.close()
    with pytest.raises(ProtocolError):
        reader.readline()
    b.close()


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"phase": 1, "done": 0, "total": 1},
        {"phase": "x", "done": -1, "total": 1},
        {"phase": "x", "done": 0, "total": "1"},
        {"phase": "x", "done": True, "total": 1},
        {"phase": "x", "done": 0, "total": 1, "rate": -5},
        {"phase": "x" * 500, "done": 0, "total": 1},
    ],
)
def test_progress_fields_checked(bad: object) -> None:
    with pytest.raises(ProtocolError):
        progress_from_json(bad)


def test_progress_round_trip() -> None:
    ev = Progress("export", 10, 20, 3.5)
    assert progress_from_json(json.loads(json.dumps(control.progress_to_json(ev)))) == ev


def test_errors_keep_type_exit_code_and_location() -> None:
    e = error_from_json(error_to_json(PointError("no mark 'x'; see rewind log")))
    assert isinstance(e, PointError) and e.exit_code == 2 and "no mark" in str(e)
    c = error_from_json(error_to_json(CorruptionError("bad crc", "/s/seg-1", 4096)))
    assert isinstance(c, CorruptionError) and c.path == "/s/seg-1" and c.offset == 4096 and c.exit_code == 1


@pytest.mark.parametrize(
    "msg",
    [
        {"ok": False},
        {"ok": False, "exit_code": "2", "message": 5},
        {"ok": False, "exit_code": 99, "error": "os.system", "message": "x\ny"},
        {"ok": False, "exit_code": 2, "error": "Progress", "message": "m"},
    ],
)
def test_untrusted_error_replies_become_plain_errors(msg: dict[str, object]) -> None:
    e = error_from_json(msg)  # type: ignore[arg-type]
    assert isinstance(e, RewindError)
    assert e.exit_code in (1, 2)
    assert "\n" not in str(e)


# ---------------------------------------------------------------- against the real engine


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real store with a little history, held open here with its control server running."""
    from rewind.engine.store import Store

    store = Store.create(str(tmp_path / "disk.img"), tmp_path / "s", size=1 << 20)
    store.live.write(0, b"A" * 8192)
    store.live.flush()
    store.mark("one")
    store.live.write(4096, b"B" * 4096)
    store.live.flush()
    srv = ControlServer(store).start()
    try:
        yield store, srv, tmp_path
    finally:
        srv.stop()
        store.close()


def test_socket_is_private(served) -> None:  # type: ignore[no-untyped-def]
    _store, srv, _ = served
    mode = os.stat(srv.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_remote_store_answers_like_the_store(served) -> None:  # type: ignore[no-untyped-def]
    store, srv, tmp_path = served
    with RemoteStore(store.dir) as rs:
        assert rs.ping()["pid"] == os.getpid()
        info = rs.info()
        assert info == json.loads(json.dumps(control.to_json(store.info())))
        marks = rs.marks()
        assert [(m.name, m.seq) for m in marks] == [(m.name, m.seq) for m in store.marks()]
        assert rs.resolve("mark:one") == store.resolve("mark:one")
        assert marks == store.marks()  # the engine's own Mark type comes back
        assert rs.stats() == store.stats() and rs.stats()
        assert rs.point_time(store.resolve("mark:one")) == store.marks()[0].time_ns
        assert [m["id"] for m in rs.maps()] == [m.id for m in store.maps()]
        assert rs.read_at("mark:one", 4096, 4096) == b"A" * 4096
        assert rs.read_at("now", 4096, 4096) == b"B" * 4096
        assert rs.diff("mark:one", "now") == [tuple(r) for r in store.diff("mark:one", "now")]
        assert rs.changed_blocks("mark:one", "now") == list(store.changed_blocks("mark:one", "now"))
        m = rs.mark("two")
        assert m.name == "two" and store.resolve("mark:two") == m.seq
        with pytest.raises(PointError):
            rs.resolve("mark:nope")
        with pytest.raises(BadInput):
            rs.read_at("now", 0, control.READ_MAX + 1)
        # The connection survives an error reply.
        assert rs.resolve("mark:two") == m.seq
        out = tmp_path / "old.img"
        events = list(rs.export("mark:one", out))
        assert all(isinstance(e, Progress) for e in events)
        data = out.read_bytes()
        assert data[:8192] == b"A" * 8192 and data[8192:] == bytes(len(data) - 8192)
        job = rs.verify()
        for _ in job:
            pass
        assert job.result == []


def test_server_checks_every_field(served) -> None:  # type: ignore[no-untyped-def]
    store, srv, _ = served
    conn = control.Connection(store.dir)
    try:
        for req in (
            {"op": 5},
            {"op": "read_at", "args": {"point": "now", "off": -1, "n": 10}},
            {"op": "read_at", "args": {"point": "now", "off": "0", "n": 10}},
            {"op": "read_at", "args": {"point": [], "off": 0, "n": 10}},
            {"op": "mark", "args": {"name": ""}},
            {"op": "mark", "args": {"name": "x", "pinned": "yes"}},
            {"op": "export", "args": {"point": "now", "out": "relative.img"}},
            {"op": "nosuch"},
            {"op": "info", "args": []},
        ):
            conn.send(req)  # type: ignore[arg-type]
            reply = conn.receive()
            assert reply["ok"] is False and reply["exit_code"] == 2, (req, reply)
        # Oversized request: the server says so and drops the connection; serve keeps running.
        conn.sock.sendall(b"x" * (control.REQUEST_MAX + 10) + b"\n")
        reply = conn.receive()
        assert reply["ok"] is False
    finally:
        conn.close()
    with RemoteStore(store.dir) as rs:
        assert rs.resolve("now") == store.head


def test_rewind_refused_while_served(served) -> None:  # type: ignore[no-untyped-def]
    store, _srv, _ = served
    with RemoteStore(store.dir) as rs, pytest.raises(BadInput, match="stop"):
        rs.rewind("mark:one")


def test_client_checks_replies(tmp_path: Path) -> None:
    """A fake server sending malformed replies: the client raises ProtocolError, never misuses them."""
    path = tmp_path / control.SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    replies = [
        {"ok": True, "result": "not a list"},  # marks
        {"ok": True, "result": [[0, -5]]},  # diff
        {"ok": True, "result": {"data": base64.b64encode(b"abc").decode()}},  # read_at (asked 4)
        {"ok": True, "result": -1},  # resolve
        {"nothing": 1},
    ]

    feed = iter(replies)

    def serve() -> None:
        # One reply per request, in order, on whichever connection asks (the client reconnects
        # after an error that may have broken the framing).
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                reader = LineReader(conn, 1 << 20)
                while reader.readline() is not None:
                    reply = next(feed, None)
                    if reply is None:
                        return
                    conn.sendall(encode(reply))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    rs = RemoteStore(tmp_path)
    calls = [
        lambda: rs.marks(),
        lambda: rs.diff("a", "b"),
        lambda: rs.read_at("now", 0, 4),
        lambda: rs.resolve("now"),
        lambda: rs.info(),
    ]
    for call in calls:
        with pytest.raises(ProtocolError):
            call()
    rs.close()
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    t.join(5)


def test_remote_store_shared_by_threads(served) -> None:  # type: ignore[no-untyped-def]
    """The console reads from several worker threads through one RemoteStore."""
    store, _srv, _ = served
    errors: list[BaseException] = []
    with RemoteStore(store.dir) as rs:

        def worker(k: int) -> None:
            try:
                for i in range(40):
                    point = "mark:one" if (i + k) % 2 else "now"
                    want = b"A" * 4096 if point == "mark:one" else b"B" * 4096
                    assert rs.read_at(point, 4096, 4096) == want
                    assert rs.resolve(point) >= 1
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors


def test_client_gone_cancels_its_job(tmp_path: Path) -> None:
    """A client that disappears mid-export (console closed, CLI killed): serve cancels the job and
    the partial output goes away; serve keeps serving."""
    import time

    from rewind.engine.store import Store

    store = Store.create(str(tmp_path / "big.img"), tmp_path / "s", size=16 << 30)
    srv = ControlServer(store).start()
    try:
        job = RemoteStore(store.dir).export("now", tmp_path / "out.img")
        it = iter(job)
        next(it)  # the export is running inside the server
        assert job._conn is not None
        job._conn.sock.close()
        deadline = time.monotonic() + 20
        while (list(tmp_path.glob(".out.img*")) or srv._jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not srv._jobs, "the job kept running after its client went away"
        assert not (tmp_path / "out.img").exists() and not list(tmp_path.glob(".out.img*"))
        with RemoteStore(store.dir) as rs:
            assert rs.resolve("now") == store.head
    finally:
        srv.stop()
        store.close()


def test_stop_cancels_running_jobs_and_waits_for_their_cleanup(tmp_path: Path) -> None:
    """serve stopping (SIGTERM) during an export through it: the job is cancelled, its partial file
    removed, before the store closes."""
    from rewind.engine.store import Store

    store = Store.create(str(tmp_path / "big.img"), tmp_path / "s", size=16 << 30)
    srv = ControlServer(store).start()
    try:
        job = RemoteStore(store.dir).export("now", tmp_path / "out.img")
        it = iter(job)
        next(it)
        assert list(tmp_path.glob(".out.img*"))
    finally:
        srv.stop()
        store.close()
    assert not srv._jobs and not list(tmp_path.glob(".out.img*")) and not (tmp_path / "out.img").exists()
    with pytest.raises(RewindError):
        for _ in it:
            pass
