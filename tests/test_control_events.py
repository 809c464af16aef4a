"""Control socket event subscription: a console attached to a running serve hears the engine's
events (marks, fades, failed writes) as JSON lines; a slow or vanished subscriber never holds the
engine up, and the server cleans up when the client goes."""

from __future__ import annotations

import queue
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_tmpfs
from rewind.engine import control
from rewind.engine.control import ControlServer, EventStream, RemoteStore, decode, encode, event_line
from rewind.engine.errors import BadInput
from rewind.engine.store import Store


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Store, ControlServer]]:
    store = Store.create(tmp_path / "disk.img", tmp_path / "store", size=1 << 20)
    srv = ControlServer(store).start()
    try:
        yield store, srv
    finally:
        srv.stop()
        store.close()


def _wait(cond: Any, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {cond}")


def test_listener_hears_marks_and_fades(served: tuple[Store, ControlServer]) -> None:
    store, srv = served
    got: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    remote = RemoteStore(store.dir)
    try:
        remote.add_listener(lambda k, d: got.put((k, d)))
        _wait(lambda: srv._subscribers == 1)
        store.live.write(0, b"a" * 4096)
        store.mark("hello")
        kind, data = got.get(timeout=10)
        assert kind == "mark" and data["name"] == "hello"
        store.fade().run()
        kinds = [got.get(timeout=10)[0]]
        assert kinds == ["fade"]
    finally:
        remote.close()
    _wait(lambda: srv._subscribers == 0)
    assert not any(isinstance(fn, control._Subscription) for fn in store._listeners)


def test_client_disconnect_ends_subscription(served: tuple[Store, ControlServer]) -> None:
    store, srv = served
    n = len(store._listeners)
    stream = EventStream(store.dir)
    _wait(lambda: srv._subscribers == 1 and len(store._listeners) == n + 1)
    stream.close()
    _wait(lambda: srv._subscribers == 0 and len(store._listeners) == n)
    store.mark("after")  # the engine is not bothered by the gone subscriber


def test_cancel_line_ends_subscription_and_connection_carries_on(served: tuple[Store, ControlServer]) -> None:
    store, srv = served
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(srv.path))
    sock.settimeout(10)
    reader = control.LineReader(sock, control.EVENT_MAX)
    try:
        sock.sendall(encode({"op": "events"}))
        assert decode(reader.readline() or b"") == {"ok": True, "result": {"subscribed": True}}
        store.mark("m1")
        msg = decode(reader.readline() or b"")
        assert msg["event"]["kind"] == "mark"
        sock.sendall(encode({"op": "cancel"}))
        assert decode(reader.readline() or b"") == {"ok": True, "result": {"subscribed": False}}
        sock.sendall(encode({"op": "ping"}))
        assert decode(reader.readline() or b"")["ok"] is True
        _wait(lambda: srv._subscribers == 0)
    finally:
        sock.close()


def test_slow_subscriber_drops_oldest_and_says_so(served: tuple[Store, ControlServer],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store, srv = served
    sub = control._Subscription(cap=4)
    for i in range(10):
        sub("mark", {"name": f"m{i}"})
    items, dropped = sub.take(0)
    assert dropped == 6 and [d["name"] for _, d in items] == ["m6", "m7", "m8", "m9"]
    assert sub.take(0) == ([], 0)


def test_subscriber_cap(served: tuple[Store, ControlServer], monkeypatch: pytest.MonkeyPatch) -> None:
    store, srv = served
    monkeypatch.setattr(control, "MAX_SUBSCRIBERS", 2)
    streams = [EventStream(store.dir), EventStream(store.dir)]
    try:
        with pytest.raises(BadInput, match="too many event subscribers"):
            EventStream(store.dir)
    finally:
        for s in streams:
            s.close()


def test_big_event_is_cut_to_fit() -> None:
    line = event_line("damage", {"problems": ["x" * 1000] * 500, "message": "bad"})
    assert len(line) <= control.EVENT_MAX
    msg = decode(line[:-1])
    assert msg["event"]["data"]["truncated"] is True and len(msg["event"]["data"]["problems"]) == 5
    line = event_line("error", {"message": "y" * (control.EVENT_MAX * 2)})
    assert len(line) <= control.EVENT_MAX


def test_bad_event_lines_are_refused() -> None:
    for bad in ([1], {"kind": 3}, {"kind": "x" * 65}, {"kind": "mark", "data": [1]}):
        with pytest.raises(control.ProtocolError):
            control.event_from_json(bad)


def test_server_stop_ends_stream_cleanly(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "disk.img", tmp_path / "store", size=1 << 20)
    srv = ControlServer(store).start()
    stream = EventStream(store.dir)
    try:
        t0 = time.monotonic()
        srv.stop()
        assert list(stream) == []  # ends, without an error
        assert time.monotonic() - t0 < 10
    finally:
        stream.close()
        store.close()


def test_write_failed_reaches_subscriber(tmp_path: Path) -> None:
    """A full disk under the history (a 1 MiB tmpfs): the failed write arrives as an event."""
    with tiny_tmpfs(tmp_path / "tiny") as mnt:
        store = Store.create(tmp_path / "disk.img", mnt / "store", size=8 << 20)
        srv = ControlServer(store).start()
        got: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        remote = RemoteStore(store.dir)
        try:
            remote.add_listener(lambda k, d: got.put((k, d)))
            _wait(lambda: srv._subscribers == 1)
            with pytest.raises(Exception):  # noqa: B017 - whatever the engine raises for a full disk
                for i in range(3 * 256):
                    store.live.write(i * 4096, b"\x5a" * 4096)
                store.flush()
            kind, data = got.get(timeout=10)
            while kind != "write-failed":
                kind, data = got.get(timeout=10)
            assert "space" in data["message"].lower() or "full" in data["message"].lower(), data
        finally:
            remote.close()
            srv.stop()
            store.close()
