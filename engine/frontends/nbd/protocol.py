"""NBD wire format: magic numbers, flags, option/command/error codes and struct layouts.

Numbers are from the NBD protocol document (doc/proto.md of the nbd project). Kept apart from the
server so tests and tools can speak the protocol without importing asyncio machinery. Also holds
`NbdClient`, a minimal blocking client (fixed newstyle, simple replies) that the tests and the
benchmark use where libnbd's Python binding is not importable (it binds only /usr/bin/python3).
"""

from __future__ import annotations

import socket
import struct
from typing import Final

# --- handshake ---------------------------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC: Final = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE: Final = 1 << 0  # handshake flags (server) and client flags
FLAG_NO_ZEROES: Final = 1 << 1
CLIENT_FLAGS_KNOWN: Final = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9

INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# --- transmission flags (per export) -----------------------------------------------------------
TF_HAS_FLAGS: Final = 1 << 0
TF_READ_ONLY: Final = 1 << 1
TF_SEND_FLUSH: Final = 1 << 2
TF_SEND_FUA: Final = 1 << 3
TF_ROTATIONAL: Final = 1 << 4
TF_SEND_TRIM: Final = 1 << 5
TF_SEND_WRITE_ZEROES: Final = 1 << 6
TF_SEND_DF: Final = 1 << 7
TF_CAN_MULTI_CONN: Final = 1 << 8

# --- transmission ------------------------------------------------------------------------------
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# Errors: Linux errno values, as the protocol requires.
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

# --- limits we enforce on what a client sends --------------------------------------------------
MAX_OPTION_LEN: Final = 64 * 1024  # option data; bigger options get REP_ERR_TOO_BIG
MAX_PAYLOAD: Final = 32 * 1024 * 1024  # READ/WRITE length; also NBD_INFO_BLOCK_SIZE's maximum
MAX_NAME_LEN: Final = 4096  # the protocol's limit on export names

# --- struct layouts (network byte order) -------------------------------------------------------
S_HANDSHAKE: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
S_CLIENT_FLAGS: Final = struct.Struct(">I")
S_OPTION: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
S_OPT_REPLY: Final = struct.Struct(">QIII")  # magic, option, reply type, length
S_EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
S_INFO_EXPORT: Final = struct.Struct(">HQH")  # INFO_EXPORT, size, transmission flags
S_INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, min, preferred, max
S_REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
S_SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, cookie

OPTION_NAMES: Final = {
    OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST", OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO", OPT_GO: "GO", OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT", OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}


class NbdError(Exception):
    """An error reply from an NBD server: `code` is the errno (transmission) or NBD_REP_ERR_* value."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class NbdClient:
    """A minimal blocking NBD client: fixed newstyle + OPT_GO, simple replies, one request at a time
    (or pipelined through `send_request` / `recv_reply`). Enough to test a server byte for byte."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.size = 0
        self.flags = 0
        self.block_size: tuple[int, int, int] | None = None
        self._cookie = 0

    @classmethod
    def connect(cls, address: str, export: str | None = "", timeout: float = 30.0) -> NbdClient:
        """Connect to "unix:PATH" or "tcp:HOST:PORT"; with `export` not None, also OPT_GO into it."""
        if address.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = address[5:]
        elif address.startswith("tcp:"):
            host, _, port = address[4:].rpartition(":")
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            target = (host.strip("[]"), int(port))
        else:
            raise ValueError(f"address must be unix:PATH or tcp:HOST:PORT, not {address!r}")
        s.settimeout(timeout)
        s.connect(target)
        c = cls(s)
        c.handshake()
        if export is not None:
            c.go(export)
        return c

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- raw i/o ---
    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError(f"server closed the connection ({got}/{n} bytes)")
            got += k
        return bytes(buf)

    def handshake(self, client_flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> int:
        magic, opt, hflags = S_HANDSHAKE.unpack(self.recv_exact(S_HANDSHAKE.size))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise ConnectionError("not a newstyle NBD server")
        self.sock.sendall(S_CLIENT_FLAGS.pack(client_flags & hflags))
        return int(hflags)

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(S_OPTION.pack(IHAVEOPT, option, len(data)) + data)

    def recv_option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = S_OPT_REPLY.unpack(self.recv_exact(S_OPT_REPLY.size))
        if magic != OPT_REPLY_MAGIC:
            raise ConnectionError(f"bad option reply magic {magic:#x}")
        return option, rtype, self.recv_exact(length) if length else b""

    def _info_option(self, option: int, name: str, infos: tuple[int, ...]) -> list[tuple[int, bytes]]:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
        self.send_option(option, data)
        got: list[tuple[int, bytes]] = []
        while True:
            _opt, rtype, payload = self.recv_option_reply()
            if rtype == REP_ACK:
                return got
            if rtype & REP_FLAG_ERROR:
                raise NbdError(payload.decode(errors="replace") or f"option error {rtype:#x}", rtype)
            if rtype == REP_INFO:
                (itype,) = struct.unpack_from(">H", payload)
                got.append((itype, payload))
                if itype == INFO_EXPORT:
                    _t, self.size, self.flags = S_INFO_EXPORT.unpack(payload)
                elif itype == INFO_BLOCK_SIZE:
                    _t, mn, pref, mx = S_INFO_BLOCK_SIZE.unpack(payload)
                    self.block_size = (mn, pref, mx)

    def go(self, name: str = "", infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> None:
        """OPT_GO into export `name`; raises NbdError (code = REP_ERR_*) if the server refuses."""
        self._info_option(OPT_GO, name, infos)

    def info(self, name: str = "", infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> list[tuple[int, bytes]]:
        return self._info_option(OPT_INFO, name, infos)

    def list_exports(self) -> list[str]:
        self.send_option(OPT_LIST)
        names: list[str] = []
        while True:
            _opt, rtype, payload = self.recv_option_reply()
            if rtype == REP_ACK:
                return names
            if rtype & REP_FLAG_ERROR:
                raise NbdError(payload.decode(errors="replace"), rtype)
            (n,) = struct.unpack_from(">I", payload)
            names.append(payload[4 : 4 + n].decode())

    # --- transmission ---
    def send_request(self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0,
                     cookie: int | None = None) -> int:
        if cookie is None:
            self._cookie += 1
            cookie = self._cookie
        self.sock.sendall(S_REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data)
        return cookie

    def recv_reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data); data is read only when error == 0 and read_len > 0."""
        magic, error, cookie = S_SIMPLE_REPLY.unpack(self.recv_exact(S_SIMPLE_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC:
            raise ConnectionError(f"bad reply magic {magic:#x}")
        data = self.recv_exact(read_len) if error == 0 and read_len else b""
        return cookie, error, data

    def _call(self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> bytes:
        cookie = self.send_request(cmd, offset, length, data, flags)
        got, error, payload = self.recv_reply(length if cmd == CMD_READ else 0)
        if got != cookie:
            raise ConnectionError(f"reply for cookie {got}, expected {cookie}")
        if error:
            raise NbdError(f"NBD error {error}", error)
        return payload

    def read(self, offset: int, length: int) -> bytes:
        return self._call(CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._call(CMD_WRITE, offset, len(data), data, CMD_FLAG_FUA if fua else 0)

    def zero(self, offset: int, length: int, fua: bool = False, no_hole: bool = False) -> None:
        flags = (CMD_FLAG_FUA if fua else 0) | (CMD_FLAG_NO_HOLE if no_hole else 0)
        self._call(CMD_WRITE_ZEROES, offset, length, flags=flags)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._call(CMD_TRIM, offset, length, flags=CMD_FLAG_FUA if fua else 0)

    def flush(self) -> None:
        self._call(CMD_FLUSH, 0, 0)

    def disconnect(self) -> None:
        """NBD_CMD_DISC, then close: the polite way to hang up."""
        try:
            self.send_request(CMD_DISC, 0, 0)
        finally:
            self.close()
