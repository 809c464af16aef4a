"""The NBD server: the live volume and every past point in time as NBD exports.

One asyncio event loop (in a daemon thread, or the caller's loop via `serve_forever`) serves any
number of clients. Speed comes from doing per batch what others do per request (PERFORMANCE.md):
bytes arrive with `recv_into` straight into a per-connection buffer, every complete request in it
is parsed, consecutive write-type requests become ONE `store.live.write_many` call fed with
memoryviews of that buffer (no copies), and all replies leave with one `writev`.

Nothing a client sends is trusted: option and request lengths are capped before anything is
allocated, offsets are checked against the export's size, export names are parsed and resolved
through the engine, and a bad magic number drops the connection. Engine failures become NBD
errors on the request (corruption -> EIO, read-only -> EPERM, journal full -> ENOSPC); no exception
reaches the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import ipaddress
import logging
import mmap
import os
import shutil
import socket
import ssl
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from rewind.engine.errors import BadInput, CorruptionError, NoSpace, ReadOnlyError
from rewind.engine.peercred import peer_allowed

from . import protocol as P

log = logging.getLogger("rewind.nbd")

_HDR = P.S_REQUEST.size  # 28
_REPLY = P.S_SIMPLE_REPLY
_INITIAL_BUF = 64 * 1024  # per-connection receive buffer at first: an idle client costs little
_STEADY_BUF = 4 * 1024 * 1024  # a busy one grows to this (several 1 MiB writes per recv) ...
# ... or to fit its largest request (up to MAX_PAYLOAD), and shrinks back once it goes quiet
_TIDY_S = 1.0  # how often a grown buffer is looked at for shrinking
_MIN_FREE = 256 * 1024  # keep at least this much room for recv_into (a quarter of a smaller buffer)
_CHEAP_MOVE = 64 * 1024  # move a partial request this small to the front rather than recv dribbles
_IOV_MAX = 1024
_MAX_OPTIONS = 10_000  # a handshake that never ends is a client bug (or an attack)
_BUF_SOCK = 4 * 1024 * 1024  # socket buffers: fewer syscalls for 1 MiB requests
_OUT_HIGH = 8 * 1024 * 1024  # transport write buffer limit before we stop reading requests
_MAX_OUT = 64 * 1024 * 1024  # reply bytes one pass may queue: pipelined 32 MiB reads cannot OOM us
MAX_CONNECTIONS = 128  # clients at once per server; more are hung up on at once
HANDSHAKE_TIMEOUT_S = 10.0  # from connect to OPT_GO (TLS included); qemu-nbd's default too
_LOG_BURST, _LOG_WINDOW_S = 10, 60.0  # client-triggered log lines: this many per window, then a count

LIVE_FLAGS = (P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_TRIM
              | P.TF_SEND_WRITE_ZEROES | P.TF_CAN_MULTI_CONN)
PAST_FLAGS = P.TF_HAS_FLAGS | P.TF_READ_ONLY | P.TF_CAN_MULTI_CONN

WriteReq = tuple[str, int, "bytes | memoryview | int"]


# --- what the server needs from the engine (docs/engine-api.md) --------------------------------
class Readable(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, off: int, n: int, /) -> bytes: ...


class LiveVolume(Readable, Protocol):
    def write_many(self, reqs: list[WriteReq], fua: bool = False) -> None: ...

    def flush(self) -> None: ...


class StoreLike(Protocol):
    @property
    def live(self) -> LiveVolume: ...

    @property
    def block_size(self) -> int: ...

    def at(self, point: str | int) -> Readable: ...

    def marks(self) -> Sequence[Any]: ...


class UnknownExport(Exception):
    """OPT_GO/OPT_INFO named an export we do not have (reply NBD_REP_ERR_UNKNOWN with the message)."""


class Export:
    """What one connection reads and writes after OPT_GO: the live volume or a past point."""

    __slots__ = ("name", "vol", "live", "readonly", "size", "flags", "description", "batch_reads")

    def __init__(self, name: str, vol: Readable, live: LiveVolume | None, description: str) -> None:
        self.name = name
        self.vol = vol
        self.live = live
        self.readonly = live is None
        self.size = int(vol.size)
        self.flags = PAST_FLAGS if live is None else LIVE_FLAGS
        self.description = description
        self.batch_reads = self.readonly and hasattr(vol, "read_many")


def open_export(store: StoreLike, name: str) -> Export:
    """Resolve an export name: "" is the live volume, "at=POINT" the read-only volume at POINT."""
    if name == "":
        return Export(name, store.live, store.live, "live volume (read-write)")
    if name.startswith("at="):
        point = name[3:]
        if not point:
            raise UnknownExport('empty point in export name: use "at=POINT", e.g. at=mark:NAME or at=seq:N')
        try:
            view = store.at(point)
        except BadInput as e:  # PointError included
            raise UnknownExport(f"no point {point!r}: {e}") from e
        seq = getattr(view, "seq", None)
        return Export(name, view, None, f"volume at {point} (seq {seq}, read-only)")
    raise UnknownExport(f'no export {name!r}: use "" for the live volume or "at=POINT" for a past point')


class LineLimiter:
    """Log at most `burst` lines per `window` seconds, then count the rest and say how many.

    What a client can make us log (bad export names, engine errors its requests hit, refused
    connections) goes through one of these: a client repeating a bad option 5,000 times must not
    write 5,000 lines (or tracebacks) to serve's stderr. The count of the lines left out is logged
    with the first line of the next window.
    """

    def __init__(self, logger: logging.Logger, burst: int = _LOG_BURST, window: float = _LOG_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._since = -window
        self._count = 0
        self.dropped = 0

    def __call__(self, level: int, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        with self._lock:
            now = self.clock()
            dropped = 0
            if now - self._since >= self.window:
                dropped, self.dropped = self.dropped, 0
                self._since, self._count = now, 0
            if self._count >= self.burst:
                self.dropped += 1
                return
            self._count += 1
        if dropped:
            self.logger.warning("NBD: %d more such lines in the last %.0f s were not logged", dropped, self.window)
        text = (msg % args) if args else msg
        self.logger.log(level, "%s", _short(text))


def _short(text: str, limit: int = 300) -> str:
    """One line of at most `limit` characters: client-chosen text (names) is cut, never echoed whole."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_limited = LineLimiter(log)  # module-wide: many connections (or servers) share one budget


def errno_for(exc: BaseException) -> int:
    """The NBD error for an engine exception; unexpected ones are logged, one short rate-limited line
    each (the server lives on; REWIND_DEBUG=1 adds the traceback, at debug level)."""
    if isinstance(exc, CorruptionError):
        _limited(logging.ERROR, "NBD request hit corruption: %s", exc)
        return P.EIO
    if isinstance(exc, ReadOnlyError):
        return P.EPERM
    if isinstance(exc, NoSpace):
        _limited(logging.WARNING, "NBD write refused: %s", exc)
        return P.ENOSPC
    if isinstance(exc, BadInput):
        return P.EINVAL
    if isinstance(exc, OSError) and exc.errno == _errno.ENOSPC:
        _limited(logging.WARNING, "NBD write failed: %s", exc)
        return P.ENOSPC
    _limited(logging.ERROR, "NBD request failed: %s: %s", type(exc).__name__, exc)
    _debug_traceback(exc)
    return P.EIO


def _debug_traceback(exc: BaseException) -> None:
    if os.environ.get("REWIND_DEBUG"):
        log.error("traceback of %r", exc, exc_info=exc)


class Policy:
    """What a server allows its connections: how many at once, how long to negotiate, TLS."""

    __slots__ = ("max_connections", "handshake_timeout", "tls")

    def __init__(self, max_connections: int = MAX_CONNECTIONS, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 tls: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.tls = tls


def _new_buffer(size: int) -> mmap.mmap:
    """A receive buffer of anonymous memory: pages cost RSS only once bytes land in them, and the
    whole buffer goes back to the system when dropped (a freed 4 MiB bytearray may stay in the heap)."""
    return mmap.mmap(-1, size)


# --- one connection ----------------------------------------------------------------------------
_ST_FLAGS, _ST_OPTIONS, _ST_TRANSMIT, _ST_CLOSED, _ST_TLS = range(5)
_KIND = {P.CMD_WRITE: "write", P.CMD_WRITE_ZEROES: "zero", P.CMD_TRIM: "trim"}
_OK_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: 0,
    P.CMD_DISC: 0,
}


class NbdConnection(asyncio.BufferedProtocol):
    """The handshake and transmission phases of one client, driven by received bytes."""

    def __init__(self, store: StoreLike, conns: set[NbdConnection], policy: Policy | None = None) -> None:
        self.store = store
        self.conns = conns
        self.policy = policy if policy is not None else Policy()
        self.export: Export | None = None
        self.transport: asyncio.Transport | None = None
        self._sock: Any = None
        self._fd = -1
        self._state = _ST_FLAGS
        self._no_zeroes = False
        self._options = 0
        self._tls_required = False  # TLS configured and a TCP client: nothing but STARTTLS before it
        self._tls_task: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None  # the handshake timeout
        self._tidy: asyncio.TimerHandle | None = None  # shrinks a grown buffer once the client is quiet
        self._buf: mmap.mmap | bytearray = bytearray(0)  # allocated when the connection is accepted
        self._mv = memoryview(self._buf)
        self._offered = 0  # room get_buffer gave the last recv: all of it filled means grow
        self._filled = False
        self._received = 0  # bytes since the last tidy tick
        self._start = 0
        self._end = 0
        self._need = 4  # bytes from _start the next item needs (sizes the buffer)
        self._skip = 0  # payload bytes still to discard (oversized write/option)
        self._out: list[bytes | memoryview] = []
        self._out_bytes = 0
        self._more = False  # requests left in the buffer because _MAX_OUT was reached
        self._writing_paused = False
        self._pending: list[WriteReq] = []
        self._pending_cookies: list[int] = []
        self._pending_fua = False
        self._reads: list[tuple[int, int, int]] = []  # (offset, length, cookie) of a past export
        self.peer = "?"

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.peer = str(transport.get_extra_info("peername") or "unix")
        unix = sock is not None and sock.family == socket.AF_UNIX
        if unix and not peer_allowed(sock):  # the socket is 0600; this catches a mode gone wrong
            _limited(logging.WARNING, "NBD: refused a connection on the unix socket from another user")
            self._state = _ST_CLOSED
            transport.abort()
            return
        if len(self.conns) >= self.policy.max_connections:
            _limited(logging.WARNING, "NBD: %d clients connected already (the limit): refused %s",
                     len(self.conns), self.peer)
            self._state = _ST_CLOSED
            transport.close()  # a plain hang-up before the greeting: the client sees EOF
            return
        self.conns.add(self)
        self._sock = sock
        self._tls_required = self.policy.tls is not None and not unix
        self._buf = _new_buffer(_INITIAL_BUF)
        self._mv = memoryview(self._buf)
        transport.set_write_buffer_limits(high=_OUT_HIGH)
        if sock is not None:
            self._fd = sock.fileno()
        if self.policy.handshake_timeout > 0:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self.policy.handshake_timeout, self._handshake_expired)
        log.debug("NBD client connected: %s", self.peer)
        self._out.append(P.S_HANDSHAKE.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _ST_CLOSED and self not in self.conns and not len(self._buf):
            return  # already cleaned up (a failed TLS handshake reports it twice)
        self._state = _ST_CLOSED
        self.conns.discard(self)
        self.export = None
        for timer in (self._deadline, self._tidy):
            if timer is not None:
                timer.cancel()
        self._deadline = self._tidy = None
        self._sock = None
        self._release_buffer()
        log.debug("NBD client gone: %s (%s)", self.peer, exc)

    def _handshake_expired(self) -> None:
        """Connected this long without reaching transmission: hang up (an idle or stuck client)."""
        self._deadline = None
        if self._state in (_ST_TRANSMIT, _ST_CLOSED):
            return
        _limited(logging.INFO, "NBD client %s: no export chosen in %.0f s: dropped", self.peer,
                 self.policy.handshake_timeout)
        self._abort()

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop taking new requests until it does.
        self._writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._more:
            self._run()  # requests left over from a pass that hit _MAX_OUT
        if self.transport is not None and not self.transport.is_closing() and not self._writing_paused:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = start = end = 0
        cap = len(self._buf)
        need = max(self._need, _HDR)
        if self._filled and cap < _STEADY_BUF:  # the last recv took all the room it had: a busy client
            self._filled = False
            self._make_room(need, min(2 * cap, _STEADY_BUF))
            start, end, cap = self._start, self._end, len(self._buf)
        min_free = min(_MIN_FREE, cap // 4)
        free = cap - end
        if start + need <= cap:  # the next item fits where it is
            if free < min_free and end - start <= _CHEAP_MOVE:
                self._make_room(need)  # but avoid recv dribbles at the very end of the buffer
        elif start > 0 or free < min_free:
            self._make_room(need)  # move it to the front, growing the buffer as its bytes arrive
        mv = self._mv[self._end :]
        self._offered = len(mv)
        return mv

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._received += nbytes
        if nbytes >= self._offered:
            self._filled = True
        self._run()

    def _run(self) -> None:
        """Handle what the buffer holds, sending replies after each pass of at most _MAX_OUT bytes."""
        while True:
            self._more = False
            try:
                self._process()
            except Exception as e:  # a bug here must cost one connection, never the server
                _limited(logging.ERROR, "NBD connection %s failed: %s: %s", self.peer, type(e).__name__, e)
                _debug_traceback(e)
                self._abort()
                return
            self._send()
            if not self._more or self._state == _ST_CLOSED:
                return
            if self._writing_paused:  # resume_writing() continues
                return

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # buffer management
    def _make_room(self, need: int, size: int = 0) -> None:
        """Move the unparsed bytes to the front, growing the buffer to `size` or to what the next
        item needs."""
        start, end = self._start, self._end
        n = end - start
        cap = len(self._buf)
        min_free = min(_MIN_FREE, cap // 4)
        want = max(need, n) + min_free
        if want > cap or size > cap or start < n:  # grow, or the move would overlap: a new buffer
            # grow at most 2x per step: a client announcing a 32 MiB write and sending nothing
            # does not get 32 MiB of our memory until the bytes actually come
            self._replace_buffer(max(cap, size, min(want, 2 * max(cap, n + min_free))))
        else:
            self._mv[:n] = self._mv[start:end]
            self._start, self._end = 0, n

    def _replace_buffer(self, size: int) -> None:
        """A new buffer of `size` bytes holding the unparsed bytes at its front."""
        start, end = self._start, self._end
        n = end - start
        new = _new_buffer(size)
        mv = memoryview(new)
        mv[:n] = self._mv[start:end]
        old_mv = self._mv
        self._buf, self._mv = new, mv
        self._start, self._end = 0, n
        with contextlib.suppress(BufferError):
            old_mv.release()  # lets the old buffer be unmapped now (write_many kept no views of it)
        if size > _INITIAL_BUF and self._tidy is None and self._state != _ST_CLOSED:
            self._received = 0
            self._tidy = asyncio.get_running_loop().call_later(_TIDY_S, self._tidy_buffer)

    def _tidy_buffer(self) -> None:
        """Shrink a grown buffer: back to _STEADY_BUF after a big request, to _INITIAL_BUF when the
        client sent nothing for a whole tick. Only an empty buffer is replaced (no views of it live)."""
        self._tidy = None
        if self._state == _ST_CLOSED:
            return
        cap = len(self._buf)
        if self._start == self._end:
            if self._received == 0:
                target = _INITIAL_BUF
            else:
                target = min(cap, _STEADY_BUF)
            if target < cap:
                self._start = self._end = 0
                self._replace_buffer(target)
        self._received = 0
        if len(self._buf) > _INITIAL_BUF and self._tidy is None:
            self._tidy = asyncio.get_running_loop().call_later(_TIDY_S, self._tidy_buffer)

    def _release_buffer(self) -> None:
        """Give the buffer back at once on close (the protocol object may live on a little)."""
        with contextlib.suppress(BufferError):
            self._mv.release()
        self._buf = bytearray(0)
        self._mv = memoryview(self._buf)
        self._start = self._end = 0

    # protocol
    def _process(self) -> None:
        while self._state != _ST_CLOSED:
            if self._skip:
                k = min(self._skip, self._end - self._start)
                self._start += k
                self._skip -= k
                if self._skip:
                    self._need = 0
                    return
            if self._state == _ST_TRANSMIT:
                self._transmit()
                return
            if self._state == _ST_TLS:
                return  # the TLS handshake takes over the connection (see _start_tls)
            if self._state == _ST_FLAGS:
                if self._end - self._start < 4:
                    self._need = 4
                    return
                (flags,) = P.S_CLIENT_FLAGS.unpack_from(self._buf, self._start)
                self._start += 4
                if flags & ~P.CLIENT_FLAGS_KNOWN:
                    log.info("NBD client %s sent unknown flags %#x: dropped", self.peer, flags)
                    self._abort()
                    return
                self._no_zeroes = bool(flags & P.FLAG_NO_ZEROES)
                self._state = _ST_OPTIONS
            elif self._state == _ST_OPTIONS:
                if not self._option():
                    return

    def _option(self) -> bool:
        """Handle one option if it is complete; False when more bytes are needed or we closed."""
        avail = self._end - self._start
        if avail < P.S_OPTION.size:
            self._need = P.S_OPTION.size
            return False
        magic, opt, length = P.S_OPTION.unpack_from(self._buf, self._start)
        if magic != P.IHAVEOPT:
            log.info("NBD client %s: bad option magic %#x: dropped", self.peer, magic)
            self._abort()
            return False
        self._options += 1
        if self._options > _MAX_OPTIONS:
            self._abort()
            return False
        if length > P.MAX_OPTION_LEN:
            if opt == P.OPT_EXPORT_NAME:  # no way to say no to EXPORT_NAME but hanging up
                self._abort()
                return False
            self._start += P.S_OPTION.size
            self._skip = length
            self._opt_reply(opt, P.REP_ERR_TOO_BIG, f"option data over {P.MAX_OPTION_LEN} bytes".encode())
            return True
        total = P.S_OPTION.size + length
        if avail < total:
            self._need = total
            return False
        data = bytes(self._mv[self._start + P.S_OPTION.size : self._start + total])
        self._start += total
        self._need = P.S_OPTION.size
        self._handle_option(opt, data)
        return self._state != _ST_CLOSED

    def _opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(P.S_OPT_REPLY.pack(P.OPT_REPLY_MAGIC, opt, rtype, len(data)))
        if data:
            self._out.append(data)

    def _handle_option(self, opt: int, data: bytes) -> None:
        if self._tls_required and opt not in (P.OPT_STARTTLS, P.OPT_ABORT):
            if opt == P.OPT_EXPORT_NAME:  # no error reply exists for it: hang up (the NBD spec)
                _limited(logging.INFO, "NBD client %s: EXPORT_NAME without TLS: dropped", self.peer)
                self._abort()
                return
            self._opt_reply(opt, P.REP_ERR_TLS_REQD, b"this server requires TLS: send NBD_OPT_STARTTLS first")
            return
        if opt == P.OPT_STARTTLS:
            self._starttls(data)
        elif opt == P.OPT_EXPORT_NAME:
            try:
                ex = open_export(self.store, data.decode("utf-8"))
            except (UnicodeDecodeError, UnknownExport) as e:
                _limited(logging.INFO, "NBD client %s: EXPORT_NAME refused: %s", self.peer, e)
                self._abort()
                return
            except Exception as e:  # an engine failure or bug on a client's name: one short line
                _limited(logging.WARNING, "NBD client %s: cannot open export: %s: %s", self.peer,
                         type(e).__name__, e)
                _debug_traceback(e)
                self._abort()
                return
            self._out.append(P.S_EXPORT_NAME_REPLY.pack(ex.size, ex.flags))
            if not self._no_zeroes:
                self._out.append(bytes(124))
            self._enter_transmission(ex)
        elif opt == P.OPT_ABORT:
            self._opt_reply(opt, P.REP_ACK)
            self._close_after_send()
        elif opt == P.OPT_LIST:
            if data:
                self._opt_reply(opt, P.REP_ERR_INVALID, b"OPT_LIST takes no data")
                return
            for name, desc in self._list_exports():
                raw = name.encode()
                self._opt_reply(opt, P.REP_SERVER, struct.pack(">I", len(raw)) + raw + desc.encode())
            self._opt_reply(opt, P.REP_ACK)
        elif opt in (P.OPT_GO, P.OPT_INFO):
            self._go_or_info(opt, data)
        else:
            name = P.OPTION_NAMES.get(opt, str(opt))
            self._opt_reply(opt, P.REP_ERR_UNSUP, f"option {name} not supported".encode())

    def _list_exports(self) -> list[tuple[str, str]]:
        out = [("", "live volume (read-write)")]
        try:
            for m in self.store.marks():
                out.append((f"at=mark:{m.name}", f"mark {m.name} (seq {m.seq}, read-only)"))
        except Exception as e:
            _limited(logging.WARNING, "NBD: cannot list the marks: %s: %s", type(e).__name__, e)
        return out

    def _starttls(self, data: bytes) -> None:
        """NBD_OPT_STARTTLS: acknowledge, then hand the socket to a TLS handshake (server side)."""
        opt = P.OPT_STARTTLS
        if self.policy.tls is None or self._sock is None or self._sock.family == socket.AF_UNIX:
            self._opt_reply(opt, P.REP_ERR_UNSUP, b"TLS is not configured on this socket")
            return
        if not self._tls_required:
            self._opt_reply(opt, P.REP_ERR_INVALID, b"TLS is already on")
            return
        if data:
            self._opt_reply(opt, P.REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            return
        if self._end != self._start:  # the client must wait for our reply before its TLS hello
            _limited(logging.INFO, "NBD client %s: data after STARTTLS before its reply: dropped", self.peer)
            self._abort()
            return
        self._opt_reply(opt, P.REP_ACK)
        self._send()
        t = self.transport
        if t is None or t.is_closing():
            return
        t.pause_reading()  # the next bytes are the TLS hello: they must not reach _process
        self._state = _ST_TLS
        self._tls_task = asyncio.get_running_loop().create_task(self._upgrade(t, self.policy.tls))

    async def _upgrade(self, raw: asyncio.Transport, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        timeout = max(1.0, self.policy.handshake_timeout) if self.policy.handshake_timeout > 0 else None
        try:
            tls = await loop.start_tls(raw, self, ctx, server_side=True, ssl_handshake_timeout=timeout)
        except Exception as e:  # refused, timed out, bad hello, hung up: this client only
            _limited(logging.INFO, "NBD client %s: TLS handshake failed: %s", self.peer, e)
            self._abort()
            self.connection_lost(None)
            return
        if tls is None or self._state == _ST_CLOSED:
            self._abort()
            return
        self.transport = tls
        self._fd = -1  # replies go through the TLS transport now, never raw to the socket
        self._tls_required = False
        tls.set_write_buffer_limits(high=_OUT_HIGH)
        self._state = _ST_OPTIONS
        self._need = P.S_OPTION.size
        log.debug("NBD client %s: TLS on", self.peer)
        if self._end > self._start:  # options that came with the end of the handshake, before we resumed
            self._run()

    def _go_or_info(self, opt: int, data: bytes) -> None:
        if len(data) < 6:
            self._opt_reply(opt, P.REP_ERR_INVALID, b"option data too short")
            return
        (nlen,) = struct.unpack_from(">I", data)
        if nlen > P.MAX_NAME_LEN or 4 + nlen + 2 > len(data):
            self._opt_reply(opt, P.REP_ERR_INVALID, b"bad export name length")
            return
        (ninfo,) = struct.unpack_from(">H", data, 4 + nlen)
        if 4 + nlen + 2 + 2 * ninfo != len(data):
            self._opt_reply(opt, P.REP_ERR_INVALID, b"bad information request count")
            return
        infos = set(struct.unpack_from(f">{ninfo}H", data, 6 + nlen))
        try:
            name = data[4 : 4 + nlen].decode("utf-8")
            ex = open_export(self.store, name)
        except UnicodeDecodeError:
            self._opt_reply(opt, P.REP_ERR_INVALID, b"export name is not UTF-8")
            return
        except UnknownExport as e:
            self._opt_reply(opt, P.REP_ERR_UNKNOWN, str(e).encode()[:4096])
            return
        except Exception as e:  # an engine failure or bug on a client's name: one short line
            _limited(logging.WARNING, "NBD client %s: cannot open export: %s: %s", self.peer,
                     type(e).__name__, e)
            _debug_traceback(e)
            # a name the engine choked on (a number out of range) is the client's to fix
            rtype = P.REP_ERR_INVALID if isinstance(e, (ValueError, ArithmeticError)) else P.REP_ERR_PLATFORM
            self._opt_reply(opt, rtype, _short(f"cannot open export: {e}").encode()[:4096])
            return
        self._opt_reply(opt, P.REP_INFO, P.S_INFO_EXPORT.pack(P.INFO_EXPORT, ex.size, ex.flags))
        bs = max(1, min(int(self.store.block_size), P.MAX_PAYLOAD))
        self._opt_reply(opt, P.REP_INFO, P.S_INFO_BLOCK_SIZE.pack(P.INFO_BLOCK_SIZE, 1, bs, P.MAX_PAYLOAD))
        if P.INFO_NAME in infos:
            self._opt_reply(opt, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + name.encode())
        if P.INFO_DESCRIPTION in infos:
            self._opt_reply(opt, P.REP_INFO, struct.pack(">H", P.INFO_DESCRIPTION) + ex.description.encode())
        self._opt_reply(opt, P.REP_ACK)
        if opt == P.OPT_GO:
            self._enter_transmission(ex)

    def _enter_transmission(self, ex: Export) -> None:
        self.export = ex
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._sock is not None:  # big socket buffers only for clients that move data
            for so in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(socket.SOL_SOCKET, so, _BUF_SOCK)
        warm = getattr(ex.vol, "warm", None)
        if ex.readonly and warm is not None:
            warm()  # a past point is about to be read: its lookups start in the background
        self._state = _ST_TRANSMIT
        self._need = _HDR
        log.debug("NBD client %s: export %r (%d bytes)", self.peer, ex.name, ex.size)

    def _transmit(self) -> None:
        """Handle every complete request in the buffer; write-type runs go down as one batch."""
        ex = self.export
        assert ex is not None
        buf, mv, out = self._buf, self._mv, self._out
        unpack, pack = P.S_REQUEST.unpack_from, _REPLY.pack
        size = ex.size
        pending = self._pending
        self._out_bytes = 0
        while True:
            if self._out_bytes > _MAX_OUT:
                self._more = True
                break
            start = self._start
            avail = self._end - start
            if avail < _HDR:
                self._need = _HDR
                break
            magic, flags, cmd, cookie, off, length = unpack(buf, start)
            if magic != P.REQUEST_MAGIC:
                log.info("NBD client %s: bad request magic %#x: dropped", self.peer, magic)
                if self._reads:
                    self._apply_reads()
                self._apply_pending()
                self._close_after_send()
                return
            err = 0
            if self._reads and cmd != P.CMD_READ:
                self._apply_reads()
            if cmd == P.CMD_WRITE:
                if length > P.MAX_PAYLOAD:  # do not buffer it: discard as it arrives
                    self._start = start + _HDR
                    self._skip = length
                    out.append(pack(P.SIMPLE_REPLY_MAGIC, P.EOVERFLOW, cookie))
                    k = min(length, self._end - self._start)
                    self._start += k
                    self._skip -= k
                    if self._skip:
                        self._need = 0
                        break
                    continue
                total = _HDR + length
                if avail < total:
                    self._need = total
                    break
                self._start = start + total
                data = mv[start + _HDR : start + total]
            else:
                self._start = start + _HDR
                data = None
            ok_flags = _OK_FLAGS.get(cmd)
            if ok_flags is None:
                err = P.EINVAL
            elif flags & ~ok_flags:
                err = P.EINVAL
            elif cmd in _KIND:
                if ex.readonly:
                    err = P.EPERM
                elif off + length > size:
                    err = P.EINVAL if cmd == P.CMD_TRIM else P.ENOSPC
                elif length:
                    kind = _KIND[cmd]
                    pending.append((kind, off, data if data is not None else length))
                    self._pending_cookies.append(cookie)
                    if flags & P.CMD_FLAG_FUA:
                        self._pending_fua = True
                    continue
            elif cmd == P.CMD_READ:
                if length > P.MAX_PAYLOAD:
                    err = P.EOVERFLOW
                elif off + length > size:
                    err = P.EINVAL
                else:
                    if pending:
                        self._apply_pending()
                    if ex.batch_reads and length:  # a past point: looked up together (see _apply_reads)
                        self._reads.append((off, length, cookie))
                        self._out_bytes += length
                        continue
                    try:
                        got: bytes | Exception = ex.vol.read(off, length) if length else b""
                    except Exception as e:
                        got = e
                    self._answer_read(off, length, cookie, got)
                    self._out_bytes += length
                    continue
            elif cmd == P.CMD_FLUSH:
                if pending:
                    self._apply_pending()
                if ex.live is not None:
                    try:
                        ex.live.flush()
                    except Exception as e:
                        err = errno_for(e)
            elif cmd == P.CMD_DISC:
                self._apply_pending()
                self._close_after_send()
                return
            out.append(pack(P.SIMPLE_REPLY_MAGIC, err, cookie))
        if pending:
            self._apply_pending()
        if self._reads:
            self._apply_reads()

    def _apply_reads(self) -> None:
        """Answer the queued reads of a past export with one read_many, in order."""
        reads = self._reads
        ex = self.export
        assert ex is not None
        got = ex.vol.read_many([(off, n) for off, n, _ in reads])  # type: ignore[attr-defined]
        for (off, n, cookie), data in zip(reads, got, strict=True):
            self._answer_read(off, n, cookie, data)
        reads.clear()

    def _answer_read(self, off: int, n: int, cookie: int, got: bytes | Exception) -> None:
        """The reply to one read: its data, or the error it met (a short read is EIO)."""
        out, magic = self._out, P.SIMPLE_REPLY_MAGIC
        if isinstance(got, Exception):
            out.append(_REPLY.pack(magic, errno_for(got), cookie))
        elif len(got) != n:
            log.error("engine read returned %d bytes for %d at %d", len(got), n, off)
            out.append(_REPLY.pack(magic, P.EIO, cookie))
        else:
            out.append(_REPLY.pack(magic, 0, cookie))
            out.append(got)

    def _apply_pending(self) -> None:
        """One write_many for the queued write/zero/trim requests, then their replies."""
        reqs, cookies = self._pending, self._pending_cookies
        if not reqs:
            return
        ex = self.export
        assert ex is not None and ex.live is not None
        err = 0
        try:
            ex.live.write_many(reqs, fua=self._pending_fua)
        except Exception as e:
            err = errno_for(e)
        pack, magic = _REPLY.pack, P.SIMPLE_REPLY_MAGIC
        self._out.extend([pack(magic, err, c) for c in cookies])
        reqs.clear()
        cookies.clear()
        self._pending_fua = False

    # output
    def _send(self) -> None:
        """Send queued replies: one writev straight to the socket when its queue is empty."""
        parts = self._out
        if not parts:
            return
        self._out = []
        t = self.transport
        if t is None or t.is_closing():
            return
        if self._fd >= 0 and t.get_write_buffer_size() == 0:
            i = 0
            while i < len(parts):
                chunk = parts[i : i + _IOV_MAX]
                try:
                    n = os.writev(self._fd, chunk)
                except BlockingIOError:
                    n = 0
                except OSError:
                    break  # let the transport see and report the error below
                want = sum(len(p) for p in chunk)
                if n == want:
                    i += len(chunk)
                    continue
                # partial: hand the rest to the transport, which waits for the socket to drain
                j = i
                for p in chunk:
                    if n >= len(p):
                        n -= len(p)
                        j += 1
                        continue
                    t.write(memoryview(p)[n:] if n else p)
                    j += 1
                    break
                for p in parts[j:]:
                    t.write(p)
                return
            if i >= len(parts):
                return
            parts = parts[i:]
        for p in parts:
            t.write(p)
        if self._state == _ST_CLOSED:
            t.close()

    def _close_after_send(self) -> None:
        self._state = _ST_CLOSED
        self._send()
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self._state = _ST_CLOSED
        self._out = []
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Server shutdown: finish what is queued, then hang up."""
        if self._state != _ST_CLOSED:
            with contextlib.suppress(Exception):
                if self._pending:
                    self._apply_pending()
                    self._send()
            self._state = _ST_CLOSED
        if self.transport is not None:
            self.transport.close()


# --- the server --------------------------------------------------------------------------------
def parse_address(address: str) -> tuple[str, str, int]:
    """("unix", PATH, 0) or ("tcp", HOST, PORT); an empty unix PATH means a private directory."""
    if address == "unix" or address.startswith("unix:"):
        return "unix", address[5:], 0
    if address.startswith("tcp:"):
        rest = address[4:]
        host, sep, port_s = rest.rpartition(":")
        if not sep:
            host, port_s = "", rest
        host = host.strip("[]") or "localhost"
        try:
            port = int(port_s)
        except ValueError:
            raise BadInput(f"bad NBD address {address!r}: the port must be a number (tcp:HOST:PORT)") from None
        if not 0 <= port <= 65535:
            raise BadInput(f"bad NBD address {address!r}: port out of range 0-65535")
        return "tcp", host, port
    raise BadInput(f"bad NBD address {address!r}: use unix:PATH or tcp:HOST:PORT")


def tcp_is_loopback(host: str) -> bool:
    """True when every address HOST names is a loopback one (127.0.0.0/8, ::1): only this machine
    can connect. 0.0.0.0, ::, a LAN address or a name that resolves to one is not."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise BadInput(f"cannot resolve NBD host {host!r}: {e.strerror}") from e
    addrs = {str(info[4][0]).split("%", 1)[0] for info in infos}
    try:
        return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)
    except ValueError:
        return False


def check_tcp_policy(host: str, allow_remote: bool, tls: bool) -> None:
    """Refuse an NBD TCP address other machines could reach, unless allowed and under TLS: the
    live volume is readable and writable by anyone who gets a connection."""
    if tcp_is_loopback(host):
        return
    if not allow_remote:
        raise BadInput(f"NBD on {host!r} is reachable from other machines: use a loopback address "
                       "(tcp:127.0.0.1:PORT), or allow it with --nbd-allow-remote and --tls-cert/--tls-key")
    if not tls:
        raise BadInput(f"NBD on {host!r} with --nbd-allow-remote needs TLS: add --tls-cert FILE --tls-key FILE "
                       "(or --tls-creds DIR)")


def tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2 or later). With `ca`, clients must show a certificate it
    signed: without one, TLS hides the traffic but anyone who can connect still gets in."""
    for path in (cert, key, ca):
        if path is not None and not os.path.isfile(path):
            raise BadInput(f"TLS: {path}: no such file (give a PEM certificate, key or CA)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as e:
        raise BadInput(f"TLS: cannot load the certificate {cert} / key {key}"
                       + (f" / CA {ca}" if ca else "") + f": {e}") from e
    return ctx


def _bind_unix(path: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0600 from the start (umask around bind)."""
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise BadInput(f"{path} exists and is not a socket: choose another --nbd path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket from a server that died
        else:
            raise BadInput(f"{path}: another server is listening there: choose another --nbd path")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise BadInput(f"cannot listen on unix:{path}: {e.strerror}") from e
    return sock


class NbdServer:
    """Serves `store` over NBD at `address` ("unix:PATH", "unix:" for a private path, "tcp:HOST:PORT").

    `start()` runs it in a daemon thread with its own event loop; `stop()` hangs up on every client
    and flushes the live volume. Inside an existing event loop use `await serve_forever()` instead.
    """

    def __init__(self, store: StoreLike, address: str = "unix:", *, allow_remote: bool = False,
                 tls: ssl.SSLContext | None = None, max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.store = store
        self._kind, self._host, self._port = parse_address(address)
        self._allow_remote = allow_remote
        self.policy = Policy(max_connections, handshake_timeout, tls)
        self._path = self._host if self._kind == "unix" else ""
        self._private_dir: str | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[NbdConnection] = set()
        self._stopped = False

    # addresses
    @property
    def address(self) -> str:
        if self._kind == "unix":
            return f"unix:{self._path}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"tcp:{host}:{self._port}"

    @property
    def uri(self) -> str:
        """A libnbd URI for the live export (append an export name for a past point)."""
        return self.uri_for("")

    def uri_for(self, export: str = "") -> str:
        """The libnbd URI of `export` ("" or "at=POINT"), e.g. for qemu-io, nbdinfo, fio."""
        from urllib.parse import quote

        name = quote(export, safe="=:")
        if self._kind == "unix":
            return f"nbd+unix:///{name}?socket={self._path}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "nbds" if self.policy.tls is not None else "nbd"
        return f"{scheme}://{host}:{self._port}/{name}"

    @property
    def connections(self) -> int:
        return len(self._conns)

    # lifecycle
    async def listen(self) -> None:
        """Bind and start accepting in the running loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop

        def factory() -> NbdConnection:
            return NbdConnection(self.store, self._conns, self.policy)

        if self._kind == "unix":
            if not self._path:
                self._private_dir = tempfile.mkdtemp(prefix="rewind-nbd-")  # mode 0700
                self._path = os.path.join(self._private_dir, "nbd.sock")
            sock = _bind_unix(self._path)
            self._servers.append(await loop.create_unix_server(factory, sock=sock))
            return
        check_tcp_policy(self._host, self._allow_remote, self.policy.tls is not None)
        try:
            infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as e:
            raise BadInput(f"cannot listen on {self.address}: {e.strerror}") from e
        # every address of HOST (localhost: 127.0.0.1 and ::1) on ONE port, also when port 0 picks it
        try:
            for addr in dict.fromkeys(str(info[4][0]) for info in infos):
                tcp = await loop.create_server(factory, addr, self._port, reuse_address=True)
                self._servers.append(tcp)
                if self._port == 0:
                    self._port = int(tcp.sockets[0].getsockname()[1])
        except OSError as e:
            for srv in self._servers:
                srv.close()
            self._servers.clear()
            raise BadInput(f"cannot listen on {self.address}: {e.strerror}") from e

    async def serve_forever(self) -> None:
        """Listen and serve until cancelled; then hang up on clients and flush."""
        if not self._servers:
            await self.listen()
        try:
            await asyncio.gather(*(srv.serve_forever() for srv in self._servers))
        finally:
            self._close_all()
            self._cleanup_path()
            await asyncio.get_running_loop().run_in_executor(None, self.store.live.flush)

    def start(self) -> NbdServer:
        """Serve from a daemon thread; returns once the socket is listening (or raises why not)."""
        if self._thread is not None:
            raise RuntimeError("NbdServer already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.listen())
            except BaseException as e:
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                self._close_all()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.sleep(0.05))  # let transports finish closing
                loop.close()

        self._thread = threading.Thread(target=run, name="rewind-nbd", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then flush the live volume. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        loop, thread = self._loop, self._thread
        if thread is not None and loop is not None and not loop.is_closed():
            def halt() -> None:
                self._close_all()
                loop.stop()

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(halt)
            thread.join(timeout=30)
        self._cleanup_path()
        self.store.live.flush()

    def __enter__(self) -> NbdServer:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _close_all(self) -> None:
        for srv in self._servers:
            srv.close()
        for c in list(self._conns):
            c.close()

    def _cleanup_path(self) -> None:
        if self._kind != "unix" or not self._path:
            return
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self._path).st_mode):
                os.unlink(self._path)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


def serve(store: StoreLike, address: str = "unix:", on_ready: Callable[[NbdServer], None] | None = None) -> None:
    """Run an NBD server in the calling thread until KeyboardInterrupt (for scripts and tools)."""
    srv = NbdServer(store, address)

    async def main() -> None:
        await srv.listen()
        if on_ready is not None:
            on_ready(srv)
        await srv.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
