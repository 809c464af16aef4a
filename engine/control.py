"""Control socket: how the CLI and the console reach a store that a running `rewind serve` holds.

`serve` takes the store's exclusive lock, so other processes cannot open it. It therefore listens on
DIR/control.sock (mode 0600, same user only) and answers JSON-lines requests on the store it holds:

    request   {"op": "mark", "args": {"name": "before", "pinned": true, "at": "seq:5"}}
    replies   {"progress": {"phase": "export", "done": 4096, "total": 8192, "rate": 1e6}}   (jobs only)
              {"ok": true, "result": ...}
              {"ok": false, "exit_code": 2, "error": "PointError", "message": "..."}

During a job the client may send {"op": "cancel"}; closing the connection cancels too. One
connection carries any number of requests, one at a time.

    request   {"op": "events"}       subscribe to the engine's listener events (consoles)
    replies   {"ok": true, "result": {"subscribed": true}}, then one line per event:
              {"event": {"kind": "write-failed", "data": {...}}}
              {"event": {"kind": "dropped", "data": {"count": 12}}}   (a slow reader missed some)
              {"event": {"kind": "ping", "data": {}}}                 (when idle, so both ends see a break)

The subscription holds the connection until the client closes it or sends {"op": "cancel"}; the
engine's listener only queues (bounded), so a slow or stuck console never slows writes. Everything that arrives on the socket is
checked (types, sizes) before use on either side, and lines are capped.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import errno
import json
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeGuard

from . import errors
from .errors import BadInput, RewindError, StoreLocked
from .jobs import Progress, end_state
from .peercred import peer_allowed

SOCKET_NAME = "control.sock"
REQUEST_MAX = 1 << 20  # a request line (paths, names, points) never needs more
RESPONSE_MAX = 64 << 20  # the largest reply: read_at of READ_MAX bytes, base64
READ_MAX = 16 << 20  # bytes per read_at
MAX_CONNECTIONS = 32
SEND_TIMEOUT_S = 60.0
TEXT_MAX = 4096  # names, points, paths, messages
EVENT_MAX = 64 << 10  # one event line; bigger data is cut down to its message
EVENT_QUEUE = 256  # events waiting for one subscriber; older ones are dropped (and counted) beyond
MAX_SUBSCRIBERS = 8
EVENT_PING_S = 5.0

Json = Any


class ProtocolError(RewindError):
    """The other end sent something that is not a valid control message."""


class ConnectionLost(RewindError):
    """The connection to the running serve broke (it stopped, or was killed)."""


# ---------------------------------------------------------------- framing


def encode(msg: dict[str, Json]) -> bytes:
    """One message as one JSON line (no raw newlines inside, by JSON's own escaping)."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode(line: bytes) -> dict[str, Json]:
    """Parse one line into a dict, or raise ProtocolError."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"control socket: malformed message ({e.__class__.__name__})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("control socket: message is not a JSON object")
    return msg


class LineReader:
    """Reads newline-terminated lines of at most `limit` bytes from a socket."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self.buf = bytearray()
        self.eof = False

    def _take(self) -> bytes | None:
        i = self.buf.find(b"\n")
        if i < 0:
            if len(self.buf) > self.limit:
                raise ProtocolError(f"control socket: message longer than {self.limit} bytes")
            return None
        if i > self.limit:
            raise ProtocolError(f"control socket: message longer than {self.limit} bytes")
        line = bytes(self.buf[:i])
        del self.buf[: i + 1]
        return line

    def readline(self) -> bytes | None:
        """The next line, blocking; None at end of stream."""
        while True:
            line = self._take()
            if line is not None:
                return line
            if self.eof:
                return None
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue  # an idle peer is fine; only sends are bounded in time
            if not chunk:
                self.eof = True
                if self.buf:
                    raise ProtocolError("control socket: connection closed mid-message")
                return None
            self.buf += chunk

    def poll(self) -> bytes | None:
        """A complete line if one is already available, without blocking; sets eof on close."""
        line = self._take()
        if line is not None or self.eof:
            return line
        while True:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                return None
            try:
                chunk = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                self.eof = True
                return None
            if not chunk:
                self.eof = True
                return None
            self.buf += chunk
            line = self._take()
            if line is not None:
                return line


# ---------------------------------------------------------------- JSON forms of engine values


def to_json(obj: Any) -> Json:
    """Engine values (dataclasses, named tuples, paths, bytes) as plain JSON values."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return {k: to_json(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_json(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(obj)).decode()
    return str(obj)


def progress_to_json(ev: Progress) -> dict[str, Json]:
    return {"phase": ev.phase, "done": ev.done, "total": ev.total, "rate": float(ev.rate)}


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def progress_from_json(d: object) -> Progress:
    """A Progress from the socket, every field checked."""
    if not isinstance(d, dict):
        raise ProtocolError("control socket: progress is not an object")
    phase, done, total, rate = d.get("phase"), d.get("done"), d.get("total"), d.get("rate", 0.0)
    if not isinstance(phase, str) or len(phase) > 100:
        raise ProtocolError("control socket: bad progress phase")
    if not (_is_int(done) and _is_int(total)) or done < 0 or total < 0:
        raise ProtocolError("control socket: bad progress counts")
    if not (_is_int(rate) or isinstance(rate, float)) or not (rate >= 0):
        raise ProtocolError("control socket: bad progress rate")
    return Progress(phase, done, total, float(rate))


def error_from_json(msg: dict[str, Json]) -> RewindError:
    """The engine error a failed reply stands for, with its exit code and one-line message."""
    code = msg.get("exit_code")
    text = msg.get("message")
    name = msg.get("error")
    if not _is_int(code) or code not in (1, 2, 130):
        code = 1
    if not isinstance(text, str):
        text = "the running serve reported an error without a message"
    text = " ".join(text.split())[:TEXT_MAX]
    cls: type[RewindError] = RewindError
    if isinstance(name, str) and name.isidentifier():
        found = getattr(errors, name, None)
        if isinstance(found, type) and issubclass(found, RewindError):
            cls = found
    if cls is errors.CorruptionError:
        path = msg.get("path")
        off = msg.get("offset")
        err: RewindError = errors.CorruptionError(
            text, path if isinstance(path, str) else "", off if _is_int(off) else -1
        )
    else:
        try:
            err = cls(text)
        except TypeError:
            err = RewindError(text)
    if err.exit_code != code:
        err.exit_code = code
    return err


def error_to_json(e: BaseException) -> dict[str, Json]:
    if isinstance(e, RewindError):
        out: dict[str, Json] = {
            "ok": False,
            "exit_code": e.exit_code,
            "error": type(e).__name__,
            "message": " ".join(str(e).split())[:TEXT_MAX],
        }
        if isinstance(e, errors.CorruptionError):
            out["path"] = e.path
            out["offset"] = e.offset
        return out
    if isinstance(e, OSError):
        return {"ok": False, "exit_code": 1, "error": "RewindError",
                "message": f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"[:TEXT_MAX]}
    return {"ok": False, "exit_code": 1, "error": "RewindError",
            "message": f"internal error in serve: {type(e).__name__}: {e}"[:TEXT_MAX]}


# ---------------------------------------------------------------- argument checks (server side)


def _arg_text(args: dict[str, Json], key: str, required: bool = True) -> str | None:
    v = args.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > TEXT_MAX or "\x00" in v:
        raise BadInput(f"control request: '{key}' must be a non-empty string")
    return v


def _arg_point(args: dict[str, Json], key: str) -> str | int:
    v = args.get(key)
    if _is_int(v):
        if v < 0:
            raise BadInput(f"control request: '{key}' must not be negative")
        return int(v)
    text = _arg_text(args, key)
    assert text is not None
    return text


def _arg_int(args: dict[str, Json], key: str, lo: int = 0, hi: int | None = None,
             required: bool = True) -> int | None:
    v = args.get(key)
    if v is None and not required:
        return None
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise BadInput(f"control request: '{key}' must be an integer {rng}")
    return int(v)


# ---------------------------------------------------------------- server


class ControlServer:
    """Serves control requests on `path` for `store` from a background thread."""

    def __init__(self, store: Any, path: str | os.PathLike[str] | None = None) -> None:
        self.store = store
        self.path = Path(path) if path is not None else Path(store.dir) / SOCKET_NAME
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._jobs: set[Any] = set()
        self._lock = threading.Lock()
        self._views: dict[int, Any] = {}
        self._views_lock = threading.Lock()
        self._subscribers = 0

    # -- lifecycle

    def start(self) -> ControlServer:
        """Bind (0600, atomically: bound in a private directory, then renamed) and listen."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a killed serve; we hold the store lock
        tmpdir = tempfile.mkdtemp(prefix=".control-", dir=self.path.parent)
        tmp = os.path.join(tmpdir, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            os.rename(tmp, self.path)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                os.rmdir(tmpdir)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="rewind-control", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cancel running jobs, close connections, remove the socket file."""
        self._stopping.set()
        with self._lock:
            jobs = list(self._jobs)
            conns = list(self._conns)
        for job in jobs:
            with contextlib.suppress(Exception):
                job.cancel()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        # Let cancelled jobs clean up (partial exports removed) before the store closes under them.
        deadline = time.monotonic() + 10
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            if not peer_allowed(conn):  # another user (the 0600 mode should have kept them out)
                conn.close()
                continue
            with self._lock:
                if len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
            t = threading.Thread(target=self._serve_conn, args=(conn,), name="rewind-control-conn",
                                 daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()

    # -- one connection

    def _serve_conn(self, conn: socket.socket) -> None:
        conn.settimeout(SEND_TIMEOUT_S)
        reader = LineReader(conn, REQUEST_MAX)
        try:
            while not self._stopping.is_set():
                try:
                    line = reader.readline()
                except ProtocolError as e:
                    conn.sendall(encode(error_to_json(e)))
                    return
                if line is None:
                    return
                try:
                    msg = decode(line)
                    reply = self._handle(msg, conn, reader)
                except Exception as e:  # every failure goes back as a reply, never kills serve
                    reply = error_to_json(e)
                conn.sendall(encode(reply))
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            with contextlib.suppress(OSError):
                conn.close()

    def _handle(self, msg: dict[str, Json], conn: socket.socket, reader: LineReader) -> dict[str, Json]:
        op = msg.get("op")
        args = msg.get("args", {})
        if not isinstance(op, str) or len(op) > 64:
            raise BadInput("control request: 'op' must be a short string")
        if not isinstance(args, dict):
            raise BadInput("control request: 'args' must be an object")
        simple = _SIMPLE_OPS.get(op)
        if simple is not None:
            return {"ok": True, "result": to_json(simple(self, args))}
        job_op = _JOB_OPS.get(op)
        if job_op is not None:
            job = job_op(self, args)
            return self._run_job(job, conn, reader)
        if op == "events":
            return self._stream_events(conn, reader)
        if op == "cancel":
            return {"ok": True, "result": None}  # nothing running on this connection
        raise BadInput(f"control request: unknown op '{op[:64]}'; upgrade the client or the serve")

    def _run_job(self, job: Any, conn: socket.socket, reader: LineReader) -> dict[str, Json]:
        """Drive `job` here, streaming progress; a 'cancel' line or a closed client cancels it."""
        if job is None or not hasattr(job, "__iter__"):
            return {"ok": True, "result": to_json(job)}
        with self._lock:
            self._jobs.add(job)
        try:
            for ev in job:
                if isinstance(ev, Progress):
                    try:
                        conn.sendall(encode({"progress": progress_to_json(ev)}))
                    except OSError:
                        job.cancel()
                        continue
                self._check_cancel(job, reader)
            return {"ok": True, "result": to_json(getattr(job, "result", None))}
        finally:
            with self._lock:
                self._jobs.discard(job)

    @staticmethod
    def _check_cancel(job: Any, reader: LineReader) -> None:
        try:
            while True:
                line = reader.poll()
                if line is None:
                    break
                with contextlib.suppress(ProtocolError):
                    if decode(line).get("op") == "cancel":
                        job.cancel()
        except ProtocolError:
            job.cancel()
        if reader.eof:
            job.cancel()

    # -- event subscriptions (consoles attached to this serve)

    def _stream_events(self, conn: socket.socket, reader: LineReader) -> dict[str, Json]:
        """Stream the store's listener events on this connection until the client closes it,
        sends a line (any line, "cancel" expected) or serve stops; then reply and carry on."""
        add = getattr(self.store, "add_listener", None)
        remove = getattr(self.store, "remove_listener", None)
        if not callable(add) or not callable(remove):
            raise BadInput("events are not available in this version of the engine")
        with self._lock:
            if self._subscribers >= MAX_SUBSCRIBERS:
                raise BadInput(f"too many event subscribers (at most {MAX_SUBSCRIBERS}): close a console")
            self._subscribers += 1
        sub = _Subscription(EVENT_QUEUE)
        add(sub)
        try:
            conn.sendall(encode({"ok": True, "result": {"subscribed": True}}))
            last = time.monotonic()
            while not self._stopping.is_set():
                items, dropped = sub.take(0.25)
                if dropped:
                    conn.sendall(encode({"event": {"kind": "dropped", "data": {"count": dropped}}}))
                for kind, data in items:
                    conn.sendall(event_line(kind, data))
                now = time.monotonic()
                if items or dropped:
                    last = now
                elif now - last >= EVENT_PING_S:
                    conn.sendall(encode({"event": {"kind": "ping", "data": {}}}))
                    last = now
                try:
                    line = reader.poll()
                except ProtocolError:
                    line = b""
                if line is not None or reader.eof:
                    break
            return {"ok": True, "result": {"subscribed": False}}
        finally:
            remove(sub)
            with self._lock:
                self._subscribers -= 1

    # -- views for read_at, cached per resolved seq (a past point never changes)

    def _view(self, point: str | int) -> Any:
        seq = self.store.resolve(point)
        with self._views_lock:
            view = self._views.get(seq)
            if view is None:
                view = self.store.at(seq)
                if len(self._views) >= 16:
                    self._views.pop(next(iter(self._views)))
                self._views[seq] = view
            return view


# ---------------------------------------------------------------- events


class _Subscription:
    """An engine listener that only queues (bounded, oldest dropped and counted): the engine's
    threads never wait for a console."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.items: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self.dropped = 0
        self.cond = threading.Condition()

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        with self.cond:
            if len(self.items) >= self.cap:
                self.items.popleft()
                self.dropped += 1
            self.items.append((str(kind), dict(data) if isinstance(data, dict) else {}))
            self.cond.notify()

    def take(self, timeout: float) -> tuple[list[tuple[str, dict[str, Any]]], int]:
        with self.cond:
            if not self.items and not self.dropped:
                self.cond.wait(timeout)
            items, self.items = list(self.items), collections.deque()
            dropped, self.dropped = self.dropped, 0
            return items, dropped


def event_line(kind: str, data: dict[str, Any]) -> bytes:
    """One event as a line of at most EVENT_MAX bytes (long lists cut, then only the message)."""
    kind = kind[:64]
    line = encode({"event": {"kind": kind, "data": to_json(data)}})
    if len(line) <= EVENT_MAX:
        return line
    short = {k: (v[:5] if isinstance(v, list) else v) for k, v in data.items()}
    short["truncated"] = True
    line = encode({"event": {"kind": kind, "data": to_json(short)}})
    if len(line) <= EVENT_MAX:
        return line
    msg = " ".join(str(data.get("message", "")).split())[:TEXT_MAX]
    return encode({"event": {"kind": kind, "data": {"message": msg, "truncated": True}}})


def event_from_json(d: object) -> tuple[str, dict[str, Json]]:
    """(kind, data) of an event line, checked."""
    if not isinstance(d, dict):
        raise ProtocolError("control socket: event is not an object")
    kind, data = d.get("kind"), d.get("data", {})
    if not isinstance(kind, str) or not kind or len(kind) > 64:
        raise ProtocolError("control socket: bad event kind")
    if not isinstance(data, dict):
        raise ProtocolError("control socket: event data is not an object")
    return kind, data


# ---------------------------------------------------------------- operations


def _op_ping(srv: ControlServer, args: dict[str, Json]) -> Json:
    return {"pid": os.getpid(), "dir": str(srv.store.dir)}


def _op_info(srv: ControlServer, args: dict[str, Json]) -> Json:
    return srv.store.info()


def _op_marks(srv: ControlServer, args: dict[str, Json]) -> Json:
    return srv.store.marks()


def _op_maps(srv: ControlServer, args: dict[str, Json]) -> Json:
    return srv.store.maps()


def _op_mark(srv: ControlServer, args: dict[str, Json]) -> Json:
    name = _arg_text(args, "name")
    pinned = args.get("pinned", False)
    if not isinstance(pinned, bool):
        raise BadInput("control request: 'pinned' must be true or false")
    at = _arg_point(args, "at") if args.get("at") is not None else None
    return srv.store.mark(name, pinned=pinned, at=at)


def _op_unmark(srv: ControlServer, args: dict[str, Json]) -> Json:
    return srv.store.unmark(_arg_text(args, "name"))


def _op_fade_preview(srv: ControlServer, args: dict[str, Json]) -> Json:
    policy = args.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise BadInput("control request: 'policy' must be text")
    return srv.store.fade_preview(policy)


def _op_pin(srv: ControlServer, args: dict[str, Json]) -> Json:
    name = _arg_text(args, "name")
    pinned = args.get("pinned", True)
    if not isinstance(pinned, bool):
        raise BadInput("control request: 'pinned' must be true or false")
    fn = getattr(srv.store, "pin", None)
    if fn is None:
        raise BadInput("pinning marks is not available yet in this version of the engine")
    return fn(name, pinned)


def _op_resolve(srv: ControlServer, args: dict[str, Json]) -> Json:
    return srv.store.resolve(_arg_point(args, "point"))


def _op_point_time(srv: ControlServer, args: dict[str, Json]) -> Json:
    return srv.store.point_time(_arg_int(args, "seq"))


def _op_stats(srv: ControlServer, args: dict[str, Json]) -> Json:
    # Times in ns since the epoch fit SQLite's 64-bit integers; larger ones are bad input, not a crash.
    since = _arg_int(args, "since", hi=(1 << 63) - 1, required=False)
    until = _arg_int(args, "until", hi=(1 << 63) - 1, required=False)
    return srv.store.stats(since, until)


def _op_diff(srv: ControlServer, args: dict[str, Json]) -> Json:
    return srv.store.diff(_arg_point(args, "a"), _arg_point(args, "b"))


def _op_changed_blocks(srv: ControlServer, args: dict[str, Json]) -> Json:
    return srv.store.changed_blocks(_arg_point(args, "a"), _arg_point(args, "b"))


def _op_read_at(srv: ControlServer, args: dict[str, Json]) -> Json:
    point = _arg_point(args, "point")
    off = _arg_int(args, "off")
    n = _arg_int(args, "n", 0, READ_MAX)
    assert off is not None and n is not None
    data = srv._view(point).read(off, n)
    return {"data": base64.b64encode(data).decode()}


def _op_rewind(srv: ControlServer, args: dict[str, Json]) -> Json:
    raise BadInput("a rewind changes the primary under its users: stop `rewind serve` first, then run it")


def _op_retention(srv: ControlServer, args: dict[str, Json]) -> Json:
    fn = getattr(srv.store, "retention", None)
    if fn is None:
        raise BadInput("retention is not available yet in this version of the engine")
    return fn()


def _op_set_retention(srv: ControlServer, args: dict[str, Json]) -> Json:
    fn = getattr(srv.store, "set_retention", None)
    if fn is None:
        raise BadInput("retention is not available yet in this version of the engine")
    kwargs: dict[str, Any] = {}
    if args.get("policy") is not None:
        kwargs["policy"] = _arg_text(args, "policy")
    if args.get("max_size") is not None:
        kwargs["max_size"] = _arg_int(args, "max_size", 0)
    if args.get("on_full") is not None:
        on_full = _arg_text(args, "on_full")
        if on_full not in ("fade", "refuse"):
            raise BadInput("control request: 'on_full' must be 'fade' or 'refuse'")
        kwargs["on_full"] = on_full
    return fn(**kwargs)


def _job_export(srv: ControlServer, args: dict[str, Json]) -> Any:
    point = _arg_point(args, "point")
    out = _arg_text(args, "out")
    assert out is not None
    if not os.path.isabs(out):
        raise BadInput("control request: 'out' must be an absolute path")
    return srv.store.export(point, out)


def _job_verify(srv: ControlServer, args: dict[str, Json]) -> Any:
    return srv.store.verify()


def _job_fade(srv: ControlServer, args: dict[str, Json]) -> Any:
    fn = getattr(srv.store, "fade", None)
    if fn is None:
        raise BadInput("fade is not available yet in this version of the engine")
    return fn()


_SIMPLE_OPS: dict[str, Callable[[ControlServer, dict[str, Json]], Json]] = {
    "ping": _op_ping,
    "info": _op_info,
    "marks": _op_marks,
    "maps": _op_maps,
    "mark": _op_mark,
    "pin": _op_pin,
    "unmark": _op_unmark,
    "fade_preview": _op_fade_preview,
    "resolve": _op_resolve,
    "point_time": _op_point_time,
    "stats": _op_stats,
    "diff": _op_diff,
    "changed_blocks": _op_changed_blocks,
    "read_at": _op_read_at,
    "rewind": _op_rewind,
    "retention": _op_retention,
    "set_retention": _op_set_retention,
}
_JOB_OPS: dict[str, Callable[[ControlServer, dict[str, Json]], Any]] = {
    "export": _job_export,
    "verify": _job_verify,
    "fade": _job_fade,
}


# ---------------------------------------------------------------- client


def socket_path(store_dir: str | os.PathLike[str]) -> Path:
    return Path(store_dir) / SOCKET_NAME


class Connection:
    """One client connection: request/reply, or a streamed job."""

    def __init__(self, store_dir: str | os.PathLike[str], connect_timeout: float = 5.0,
                 retry_s: float = 2.0) -> None:
        path = socket_path(store_dir)
        deadline = time.monotonic() + retry_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(connect_timeout)
            try:
                sock.connect(str(path))
                break
            except OSError as e:
                sock.close()
                # A serve that is starting has the lock but not yet the socket: wait a little.
                retryable = e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
                if not retryable or time.monotonic() >= deadline:
                    raise StoreLocked(
                        f"{store_dir} is in use by another process (rewind serve?) and its control socket "
                        f"does not answer ({e.strerror}); wait for it to start, or stop it and retry"
                    ) from None
                time.sleep(0.05)
        sock.settimeout(None)
        self.sock = sock
        self.reader = LineReader(sock, RESPONSE_MAX)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, msg: dict[str, Json]) -> None:
        data = encode(msg)
        if len(data) > REQUEST_MAX:
            raise BadInput("control request too large")
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ConnectionLost(f"lost the connection to the running serve ({e.strerror})") from None

    def receive(self) -> dict[str, Json]:
        try:
            line = self.reader.readline()
        except OSError as e:
            raise ConnectionLost(f"lost the connection to the running serve ({e.strerror})") from None
        if line is None:
            raise ConnectionLost("the running serve closed the connection (did it stop?)")
        return decode(line)

    def call(self, op: str, **args: Json) -> Json:
        """One request, one reply; an error reply raises the engine error it names."""
        self.send({"op": op, "args": args})
        while True:
            msg = self.receive()
            if "progress" in msg:  # not expected for simple ops; tolerate
                continue
            return _result(msg)


def _result(msg: dict[str, Json]) -> Json:
    ok = msg.get("ok")
    if ok is True:
        return msg.get("result")
    if ok is False:
        raise error_from_json(msg)
    raise ProtocolError("control socket: reply has neither 'ok' nor 'progress'")


class RemoteJob:
    """A job running inside serve: iterate for Progress events, cancel(), then `result`.
    The same shape as engine jobs, so the CLI and the console drive both alike."""

    def __init__(self, store_dir: str | os.PathLike[str], op: str, args: dict[str, Json],
                 name: str | None = None) -> None:
        self.store_dir = store_dir
        self.op = op
        self.args = args
        self.name = name or op
        self.state = "pending"
        self.result: Json = None
        self.error: BaseException | None = None
        self.last: Progress | None = None
        self._conn: Connection | None = None
        self._cancel_sent = False

    def cancel(self) -> None:
        """Ask serve to stop the job at its next safe point (it cleans up after itself)."""
        if self._conn is not None and not self._cancel_sent and self.state == "running":
            self._cancel_sent = True
            with contextlib.suppress(RewindError, OSError):
                self._conn.send({"op": "cancel"})

    @property
    def cancelled(self) -> bool:
        return self._cancel_sent

    def __iter__(self) -> Iterator[Progress]:
        if self.state != "pending":
            raise RuntimeError(f"job {self.name} already {self.state}")
        self._conn = Connection(self.store_dir)
        self.state = "running"
        try:
            self._conn.send({"op": self.op, "args": self.args})
            while True:
                msg = self._conn.receive()
                if "progress" in msg:
                    ev = progress_from_json(msg["progress"])
                    self.last = ev
                    yield ev
                    continue
                self.result = _result(msg)
                break
        except BaseException as e:
            end_state(self, e)
            raise
        finally:
            self._conn.close()
        self.state = "done"

    def run(self, on_event: Callable[[Progress], None] | None = None) -> Json:
        for ev in self:
            if on_event is not None:
                on_event(ev)
        return self.result


class EventStream:
    """The engine events of a running serve, on a connection of their own: iterate for
    (kind, data) pairs (pings are skipped); close() ends it from any thread."""

    def __init__(self, store_dir: str | os.PathLike[str]) -> None:
        self._conn = Connection(store_dir)
        self._conn.reader = LineReader(self._conn.sock, EVENT_MAX)
        self.closed = False
        try:
            self._conn.send({"op": "events", "args": {}})
            _result(self._conn.receive())
        except BaseException:
            self._conn.close()
            raise

    def __iter__(self) -> Iterator[tuple[str, dict[str, Json]]]:
        try:
            while True:
                try:
                    msg = self._conn.receive()
                except ConnectionLost:
                    return  # serve stopped (or we closed): the stream simply ends
                except ProtocolError:
                    if self.closed:
                        return
                    raise
                if "event" not in msg:
                    _result(msg)  # the end of the subscription (or the error that ended it)
                    return
                kind, data = event_from_json(msg["event"])
                if kind != "ping":
                    yield kind, data
        finally:
            self._conn.close()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self._conn.sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()


class RemoteStore:
    """The parts of Store that work through a running `rewind serve` (for the CLI and the console).
    Thread-safe: simple calls share one connection under a lock; jobs get their own."""

    def __init__(self, store_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(store_dir)
        self._lock = threading.Lock()
        self._conn: Connection | None = Connection(self.dir)
        self.remote = True
        self._listeners: list[Callable[[str, dict[str, Json]], None]] = []
        self._ev_lock = threading.Lock()
        self._ev_stop = threading.Event()
        self._ev_thread: threading.Thread | None = None
        self._stream: EventStream | None = None

    def close(self) -> None:
        self._stop_events()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- events: the same listener interface as Store, fed by an "events" subscription

    def events(self) -> EventStream:
        return EventStream(self.dir)

    def add_listener(self, fn: Callable[[str, dict[str, Json]], None]) -> None:
        """Call fn(kind, data) for each engine event of the serve (from a background thread);
        the subscription reconnects if serve restarts."""
        with self._ev_lock:
            self._listeners.append(fn)
            if self._ev_thread is None or not self._ev_thread.is_alive():
                self._ev_stop.clear()
                self._ev_thread = threading.Thread(target=self._event_loop, name="rewind-remote-events",
                                                   daemon=True)
                self._ev_thread.start()

    def remove_listener(self, fn: Callable[[str, dict[str, Json]], None]) -> None:
        with self._ev_lock:
            if fn in self._listeners:
                self._listeners.remove(fn)
            last = not self._listeners
        if last:
            self._stop_events()

    def _stop_events(self) -> None:
        self._ev_stop.set()
        with self._ev_lock:
            stream, thread = self._stream, self._ev_thread
        if stream is not None:
            stream.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _event_loop(self) -> None:
        delay = 0.2
        while not self._ev_stop.is_set():
            try:
                stream = EventStream(self.dir)
            except BadInput:
                return  # a serve without events (older), or too many subscribers: stay quiet
            except (RewindError, OSError):
                self._ev_stop.wait(delay)
                delay = min(5.0, delay * 2)
                continue
            with self._ev_lock:
                self._stream = stream
            if self._ev_stop.is_set():
                stream.close()
            delay = 0.2
            try:
                for kind, data in stream:
                    with self._ev_lock:
                        fns = list(self._listeners)
                    for fn in fns:
                        with contextlib.suppress(Exception):  # a broken listener must not end the stream
                            fn(kind, data)
            except (RewindError, OSError):
                pass
            finally:
                with self._ev_lock:
                    self._stream = None
            self._ev_stop.wait(delay)

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: str, **args: Json) -> Json:
        with self._lock:
            for attempt in (0, 1):
                if self._conn is None:
                    self._conn = Connection(self.dir)
                try:
                    self._conn.send({"op": op, "args": args})
                except ConnectionLost:
                    # Nothing was delivered: a serve that restarted, or an idle connection it
                    # dropped. Reconnect once and send again.
                    self._conn.close()
                    self._conn = None
                    if attempt:
                        raise
                    continue
                try:
                    while True:
                        msg = self._conn.receive()
                        if "progress" not in msg:
                            return _result(msg)
                except (ProtocolError, ConnectionLost):
                    self._conn.close()  # framing may be lost: start afresh next time
                    self._conn = None
                    raise
            raise AssertionError("unreachable")

    # -- the Store methods, checked on the way in

    def ping(self) -> dict[str, Json]:
        r = self._call("ping")
        if not isinstance(r, dict):
            raise ProtocolError("control socket: bad ping reply")
        return r

    def info(self) -> dict[str, Json]:
        r = self._call("info")
        if not isinstance(r, dict):
            raise ProtocolError("control socket: info is not an object")
        return r

    def marks(self) -> list[Any]:
        r = self._call("marks")
        if not isinstance(r, list):
            raise ProtocolError("control socket: marks is not a list")
        return [mark_from_json(m) for m in r]

    def maps(self) -> list[dict[str, Json]]:
        r = self._call("maps")
        if not isinstance(r, list) or not all(isinstance(m, dict) for m in r):
            raise ProtocolError("control socket: maps is not a list of objects")
        return r

    def mark(self, name: str, pinned: bool = False, at: str | int | None = None) -> Any:
        if at is None:
            return mark_from_json(self._call("mark", name=name, pinned=pinned))
        return mark_from_json(self._call("mark", name=name, pinned=pinned, at=at))

    def unmark(self, name: str) -> Any:
        return mark_from_json(self._call("unmark", name=name))

    def fade_preview(self, policy: str | None = None) -> dict[str, Any]:
        r = self._call("fade_preview", policy=policy)
        if not isinstance(r, dict):
            raise ProtocolError("control socket: fade_preview is not an object")
        return r

    def pin(self, name: str, pinned: bool = True) -> Any:
        return mark_from_json(self._call("pin", name=name, pinned=pinned))

    def resolve(self, point: str | int) -> int:
        return _check_int(self._call("resolve", point=point), "seq")

    def point_time(self, seq: int) -> int:
        return _check_int(self._call("point_time", seq=seq), "time")

    def stats(self, since_ns: int | None = None, until_ns: int | None = None) -> list[Any]:
        r = self._call("stats", since=since_ns, until=until_ns)
        if not isinstance(r, list):
            raise ProtocolError("control socket: stats is not a list")
        return [stat_from_json(row) for row in r]

    def diff(self, a: str | int, b: str | int) -> list[tuple[int, int]]:
        r = self._call("diff", a=a, b=b)
        if not isinstance(r, list):
            raise ProtocolError("control socket: diff is not a list")
        out: list[tuple[int, int]] = []
        for item in r:
            if (not isinstance(item, list) or len(item) != 2 or not all(_is_int(x) and x >= 0 for x in item)):
                raise ProtocolError("control socket: bad diff range")
            out.append((item[0], item[1]))
        return out

    def changed_blocks(self, a: str | int, b: str | int) -> list[int]:
        r = self._call("changed_blocks", a=a, b=b)
        if not isinstance(r, list) or not all(_is_int(x) and x >= 0 for x in r):
            raise ProtocolError("control socket: bad changed_blocks reply")
        return list(r)

    def read_at(self, point: str | int, off: int, n: int) -> bytes:
        if not (_is_int(off) and _is_int(n)) or off < 0 or n < 0:
            raise BadInput("read_at: offset and length must be non-negative integers")
        out = bytearray()
        while n > 0 or not out:
            step = min(n, READ_MAX)
            r = self._call("read_at", point=point, off=off, n=step)
            data = r.get("data") if isinstance(r, dict) else None
            if not isinstance(data, str):
                raise ProtocolError("control socket: bad read_at reply")
            try:
                chunk = base64.b64decode(data, validate=True)
            except ValueError:
                raise ProtocolError("control socket: read_at data is not base64") from None
            if len(chunk) != step:
                raise ProtocolError(f"control socket: read_at returned {len(chunk)} bytes, asked {step}")
            out += chunk
            off += step
            n -= step
            if step == 0:
                break
        return bytes(out)

    def export(self, point: str | int, out: str | os.PathLike[str]) -> RemoteJob:
        path = os.path.abspath(os.fspath(out))
        return RemoteJob(self.dir, "export", {"point": point, "out": path}, name="export")

    def verify(self) -> RemoteJob:
        return RemoteJob(self.dir, "verify", {}, name="verify")

    def fade(self) -> RemoteJob:
        return RemoteJob(self.dir, "fade", {}, name="fade")

    def rewind(self, point: str | int) -> Any:
        return self._call("rewind", point=point)

    def retention(self) -> Json:
        return self._call("retention")

    def set_retention(self, policy: str | None = None, max_size: int | None = None,
                      on_full: str | None = None) -> Json:
        return self._call("set_retention", policy=policy, max_size=max_size, on_full=on_full)


def _check_int(v: Json, what: str) -> int:
    if not _is_int(v) or v < 0:
        raise ProtocolError(f"control socket: {what} is not a non-negative integer")
    return int(v)


def mark_from_json(d: Json) -> Any:
    """A Mark (the engine's type when it has one with these fields) from a checked dict."""
    if not isinstance(d, dict):
        raise ProtocolError("control socket: mark is not an object")
    name, seq, t, pinned = d.get("name"), d.get("seq"), d.get("time_ns"), d.get("pinned", False)
    if not isinstance(name, str) or not _is_int(seq) or not _is_int(t) or not isinstance(pinned, bool):
        raise ProtocolError("control socket: bad mark")
    mark_type = _engine_type("Mark")
    if mark_type is not None:
        with contextlib.suppress(TypeError):
            return mark_type(name=name, seq=seq, time_ns=t, pinned=pinned)
    return _Record(name=name, seq=seq, time_ns=t, pinned=pinned)


def stat_from_json(d: Json) -> Any:
    if not isinstance(d, dict) or not all(_is_int(d.get(k)) for k in ("t", "writes", "bytes", "journal_bytes")):
        raise ProtocolError("control socket: bad stats row")
    row_type = _engine_type("StatRow")
    fields = {k: d[k] for k in ("t", "writes", "bytes", "journal_bytes")}
    if row_type is not None:
        with contextlib.suppress(TypeError):
            return row_type(**fields)
    return _Record(**fields)


class _Record:
    """Attribute access over checked fields, when the engine's own type is not importable."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Record) and self.__dict__ == other.__dict__


def _engine_type(name: str) -> Any:
    """The engine's value type `name`, looked up where the store keeps it (None if absent)."""
    try:
        from . import store as store_mod
    except ImportError:
        return None
    return getattr(store_mod, name, None)
