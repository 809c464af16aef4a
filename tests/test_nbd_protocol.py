"""The NBD server at the byte level: handshake, options, requests, and every way a client can
send nonsense. A raw socket client (rewind.engine.frontends.nbd.protocol.NbdClient) talks to an
NbdServer over a real Store, so these also check that engine errors become NBD errors."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from rewind.engine.errors import BadInput, CorruptionError, NoSpace, ReadOnlyError
from rewind.engine.frontends.nbd import protocol as P
from rewind.engine.frontends.nbd.protocol import NbdClient, NbdError
from rewind.engine.frontends.nbd.server import NbdServer, errno_for
from rewind.engine.store import Store

SIZE = 4 * 1024 * 1024


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.create(tmp_path / "disk.img", tmp_path / "store", size=SIZE)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def server(store: Store, tmp_path: Path) -> Iterator[NbdServer]:
    srv = NbdServer(store, f"unix:{tmp_path / 'nbd.sock'}")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def raw(server: NbdServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(server.address[5:])
    return s


def connect(server: NbdServer, export: str | None = "") -> NbdClient:
    return NbdClient.connect(server.address, export, timeout=10)


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server hung up (EOF or reset) rather than answering."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def still_serves(server: NbdServer) -> None:
    with connect(server) as c:
        c.write(0, b"ok")
        assert c.read(0, 2) == b"ok"


# --- handshake and options ---------------------------------------------------------------------
def test_greeting_is_fixed_newstyle_with_no_zeroes(server: NbdServer) -> None:
    with raw(server) as s:
        magic, opt, flags = P.S_HANDSHAKE.unpack(s.recv(18, socket.MSG_WAITALL))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        assert flags == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES


def test_unknown_client_flags_drop_the_connection(server: NbdServer) -> None:
    with raw(server) as s:
        s.recv(18, socket.MSG_WAITALL)
        s.sendall(struct.pack(">I", 1 << 7))
        assert closed_by_server(s)
    still_serves(server)


def test_bad_option_magic_drops_the_connection(server: NbdServer) -> None:
    c = connect(server, None)
    c.sock.sendall(struct.pack(">QII", 0x1234, P.OPT_GO, 0))
    assert closed_by_server(c.sock)
    c.close()
    still_serves(server)


def test_oversize_option_is_refused_and_skipped(server: NbdServer) -> None:
    with connect(server, None) as c:
        big = 1024 * 1024
        c.send_option(P.OPT_LIST, b"\0" * big)
        _opt, rtype, msg = c.recv_option_reply()
        assert rtype == P.REP_ERR_TOO_BIG and b"option" in msg
        c.go("")  # the connection is in sync again
        c.write(0, b"x" * 10)
        assert c.read(0, 10) == b"x" * 10


def test_oversize_export_name_hangs_up(server: NbdServer) -> None:
    c = connect(server, None)
    c.sock.sendall(struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 1 << 30))
    assert closed_by_server(c.sock)
    c.close()


def test_unsupported_options_get_err_unsup(server: NbdServer) -> None:
    with connect(server, None) as c:
        for opt in (P.OPT_STRUCTURED_REPLY, P.OPT_STARTTLS, P.OPT_LIST_META_CONTEXT, 99):
            c.send_option(opt)
            got, rtype, _msg = c.recv_option_reply()
            assert (got, rtype) == (opt, P.REP_ERR_UNSUP)
        c.go("")
        assert c.size == SIZE


def test_list_shows_live_and_one_export_per_mark(server: NbdServer, store: Store) -> None:
    store.live.write(0, b"a" * 4096)
    store.mark("before")
    store.live.write(0, b"b" * 4096)
    store.mark("after upgrade")
    with connect(server, None) as c:
        assert c.list_exports() == ["", "at=mark:before", "at=mark:after upgrade"]
        c.send_option(P.OPT_LIST, b"junk")
        assert c.recv_option_reply()[1] == P.REP_ERR_INVALID


def test_info_then_go(server: NbdServer, store: Store) -> None:
    with connect(server, None) as c:
        infos = c.info("", (P.INFO_BLOCK_SIZE, P.INFO_NAME, P.INFO_DESCRIPTION))
        kinds = [k for k, _ in infos]
        assert kinds[:2] == [P.INFO_EXPORT, P.INFO_BLOCK_SIZE] and P.INFO_DESCRIPTION in kinds
        assert c.size == SIZE
        assert c.block_size == (1, store.block_size, 32 * 1024 * 1024)
        want = P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES
        assert c.flags & want == want and not c.flags & P.TF_READ_ONLY
        c.go("")
        c.write(5, b"hello")
        assert c.read(5, 5) == b"hello"


def test_go_unknown_export_and_bad_points(server: NbdServer, store: Store) -> None:
    store.live.write(0, b"z" * 512)
    with connect(server, None) as c:
        for name in ("nope", "at=", "at=mark:missing", "at=seq:99999999", "at=yesterday-ish"):
            with pytest.raises(NbdError) as ei:
                c.go(name)
            assert ei.value.code == P.REP_ERR_UNKNOWN, name
            assert str(ei.value), "the refusal carries a message"
        c.go("")  # still in the option phase and usable
        assert c.read(0, 512) == b"z" * 512


def test_malformed_go_data_is_invalid_not_fatal(server: NbdServer) -> None:
    with connect(server, None) as c:
        bad = [
            b"",  # too short
            struct.pack(">I", 100) + b"ab" + struct.pack(">H", 0),  # name runs past the end
            struct.pack(">I", 0) + struct.pack(">H", 5),  # 5 info requests, none present
            struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
        ]
        for data in bad:
            c.send_option(P.OPT_GO, data)
            assert c.recv_option_reply()[1] == P.REP_ERR_INVALID, data
        c.go("")


def test_abort_is_acknowledged_then_closed(server: NbdServer) -> None:
    with connect(server, None) as c:
        c.send_option(P.OPT_ABORT)
        assert c.recv_option_reply()[1] == P.REP_ACK
        assert closed_by_server(c.sock)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_old_style_entry(server: NbdServer, no_zeroes: bool) -> None:
    c = NbdClient(raw(server))
    with c:
        c.handshake(P.FLAG_FIXED_NEWSTYLE | (P.FLAG_NO_ZEROES if no_zeroes else 0))
        c.send_option(P.OPT_EXPORT_NAME, b"")
        size, flags = P.S_EXPORT_NAME_REPLY.unpack(c.recv_exact(10))
        assert size == SIZE and flags & P.TF_SEND_FLUSH
        if not no_zeroes:
            assert c.recv_exact(124) == bytes(124)
        c.write(0, b"q")
        assert c.read(0, 1) == b"q"


def test_export_name_unknown_hangs_up(server: NbdServer) -> None:
    c = connect(server, None)
    c.send_option(P.OPT_EXPORT_NAME, b"at=mark:nothing")
    assert closed_by_server(c.sock)
    c.close()


# --- transmission ------------------------------------------------------------------------------
def test_commands_round_trip(server: NbdServer, store: Store) -> None:
    with connect(server) as c:
        c.write(100, b"A" * 9000)
        c.write(4096, b"B" * 10, fua=True)
        assert c.read(100, 9000) == b"A" * 3996 + b"B" * 10 + b"A" * 4994
        c.zero(200, 100)
        c.zero(300, 100, no_hole=True, fua=True)
        assert c.read(100, 300) == b"A" * 100 + bytes(200)
        c.trim(8192, 4096)
        assert c.read(8192, 4096) == bytes(4096)
        c.flush()
        c.write(SIZE - 1, b"E")
        assert c.read(SIZE - 1, 1) == b"E"
        assert c.read(0, 0) == b""
        c.write(0, b"")
    assert store.live.read(100, 100) == b"A" * 100


def test_out_of_range_requests_get_errors_and_connection_stays(server: NbdServer) -> None:
    with connect(server) as c:
        cases = [
            (P.CMD_READ, SIZE - 10, 11, P.EINVAL),
            (P.CMD_READ, 2**63, 1, P.EINVAL),
            (P.CMD_READ, 0, 32 * 1024 * 1024 + 1, P.EOVERFLOW),
            (P.CMD_WRITE_ZEROES, SIZE, 1, P.ENOSPC),
            (P.CMD_TRIM, SIZE - 1, 2, P.EINVAL),
            (P.CMD_BLOCK_STATUS, 0, 512, P.EINVAL),
            (P.CMD_CACHE, 0, 512, P.EINVAL),
            (77, 0, 1, P.EINVAL),
        ]
        for cmd, off, length, want in cases:
            with pytest.raises(NbdError) as ei:
                c._call(cmd, off, length)
            assert ei.value.code == want, (cmd, off, length)
        with pytest.raises(NbdError) as ei:
            c.write(SIZE - 2, b"abc")
        assert ei.value.code == P.ENOSPC
        with pytest.raises(NbdError) as ei:  # a flag we never advertised
            c._call(P.CMD_WRITE, 0, 1, b"x", flags=P.CMD_FLAG_FAST_ZERO)
        assert ei.value.code == P.EINVAL
        c.write(0, b"fine")
        assert c.read(0, 4) == b"fine"


def test_oversize_write_payload_is_discarded_in_sync(server: NbdServer) -> None:
    with connect(server) as c:
        n = 32 * 1024 * 1024 + 4096
        cookie = c.send_request(P.CMD_WRITE, 0, n, b"\x55" * n)
        got, err, _ = c.recv_reply()
        assert (got, err) == (cookie, P.EOVERFLOW)
        assert c.read(0, 4096) == bytes(4096), "nothing of the oversize write was applied"
        c.write(0, b"after")
        assert c.read(0, 5) == b"after"


def test_largest_write_and_read(server: NbdServer) -> None:
    with connect(server) as c:
        data = os.urandom(SIZE)  # the whole volume in one request (below the 32 MiB cap)
        c.write(0, data)
        assert c.read(0, SIZE) == data


def test_bad_request_magic_drops_only_that_connection(server: NbdServer) -> None:
    other = connect(server)
    c = connect(server)
    c.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, P.CMD_READ, 1, 0, 10))
    assert closed_by_server(c.sock)
    c.close()
    other.write(0, b"alive")
    assert other.read(0, 5) == b"alive"
    other.disconnect()


def test_pipelined_requests_see_earlier_writes(server: NbdServer) -> None:
    """Many requests in flight: replies match cookies and a read sees writes queued before it."""
    with connect(server) as c:
        model = bytearray(SIZE)
        expect: dict[int, bytes | None] = {}
        blob = bytearray()
        import random

        rnd = random.Random(7)
        for i in range(400):
            off = rnd.randrange(0, 64 * 1024)
            n = rnd.randrange(1, 6000)
            kind = rnd.choice("wwwrzt")
            cookie = 1000 + i
            if kind == "w":
                data = bytes([rnd.randrange(256)]) * n
                model[off : off + n] = data
                blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, cookie, off, n) + data
                expect[cookie] = None
            elif kind in "zt":
                model[off : off + n] = bytes(n)
                cmd = P.CMD_WRITE_ZEROES if kind == "z" else P.CMD_TRIM
                blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, cmd, cookie, off, n)
                expect[cookie] = None
            else:
                blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, cookie, off, n)
                expect[cookie] = bytes(model[off : off + n])
        sender = threading.Thread(target=c.sock.sendall, args=(bytes(blob),))
        sender.start()
        for _ in range(len(expect)):
            cookie, err, _ = c.recv_reply()
            assert err == 0
            want = expect.pop(cookie)
            if want is not None:
                assert c.recv_exact(len(want)) == want, cookie
        sender.join()
        assert c.read(0, 64 * 1024 + 6000) == bytes(model[: 64 * 1024 + 6000])


def test_past_export_is_read_only_and_stays_connected(server: NbdServer, store: Store) -> None:
    store.live.write(0, b"old!" * 1024)
    store.mark("m")
    store.live.write(0, b"new!" * 1024)
    with connect(server, "at=mark:m") as c:
        assert c.flags & P.TF_READ_ONLY and not c.flags & P.TF_SEND_TRIM
        for call in (lambda: c.write(0, b"x"), lambda: c.zero(0, 10), lambda: c.trim(0, 10)):
            with pytest.raises(NbdError) as ei:
                call()
            assert ei.value.code == P.EPERM
        assert c.read(0, 4096) == b"old!" * 1024
    assert store.live.read(0, 4) == b"new!"


def test_disc_closes_and_several_clients_work_at_once(server: NbdServer) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with connect(server) as c:
                base = k * 65536
                for i in range(50):
                    data = bytes([k, i]) * 1000
                    c.write(base + i * 2000, data)
                    assert c.read(base + i * 2000, 2000) == data
                c.flush()
                c.disconnect()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_client_vanishing_mid_request_leaves_server_healthy(server: NbdServer) -> None:
    c = connect(server)
    c.sock.sendall(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 100000) + b"x" * 5000)
    c.close()
    still_serves(server)


# --- engine errors -> NBD errors ---------------------------------------------------------------
def test_errno_for_engine_errors() -> None:
    assert errno_for(CorruptionError("bad crc", "seg", 12)) == P.EIO
    assert errno_for(ReadOnlyError("read-only")) == P.EPERM
    assert errno_for(NoSpace("journal full")) == P.ENOSPC
    assert errno_for(BadInput("range")) == P.EINVAL
    assert errno_for(ZeroDivisionError("bug")) == P.EIO


def test_corrupt_journal_read_gives_eio(server: NbdServer, store: Store) -> None:
    """A past read that needs a record whose checksum fails is EIO, never the wrong bytes."""
    pattern = b"CORRUPT-ME-" * 372 + b"...."  # 4096 bytes, findable in the journal
    store.live.write(0, pattern)
    store.mark("p")
    store.live.write(0, bytes(4096))
    store.live.flush()
    hits = []
    for f in sorted(Path(store.dir).rglob("*")):
        if f.is_file():
            at = f.read_bytes().find(pattern)
            if at >= 0:
                hits.append((f, at))
    if not hits:
        pytest.skip("the journal does not store payloads verbatim (compressed?): cannot aim a bit flip")
    for f, at in hits:
        with open(f, "r+b") as fh:
            fh.seek(at + 100)
            fh.write(b"!")
    with connect(server, "at=mark:p") as c:
        with pytest.raises(NbdError) as ei:
            c.read(0, 4096)
        assert ei.value.code == P.EIO
        c.read(8192, 4096)  # a block that needs no corrupt record still reads


# --- addresses ---------------------------------------------------------------------------------
def test_unix_socket_is_private(store: Store, tmp_path: Path) -> None:
    with NbdServer(store, "unix:") as srv:
        path = srv.address[5:]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert srv.uri == f"nbd+unix:///?socket={path}"
        assert srv.uri_for("at=mark:x") == f"nbd+unix:///at=mark:x?socket={path}"
        still_serves(srv)
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    with NbdServer(store, f"unix:{tmp_path / 'my.sock'}") as srv:
        assert stat.S_IMODE(os.stat(tmp_path / "my.sock").st_mode) == 0o600


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", ""])
def test_tcp_port_zero_picks_one_port(store: Store, host: str) -> None:
    if host == "[::1]" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        srv = NbdServer(store, f"tcp:{host}:0").start()
    except BadInput as e:
        pytest.skip(f"cannot listen on {host}: {e}")
    with srv:
        port = int(srv.address.rsplit(":", 1)[1])
        want = host or "localhost"
        assert port > 0 and srv.uri == f"nbd://{want}:{port}/"
        # every address the name resolves to listens on that one port
        for *_, sockaddr in socket.getaddrinfo(want.strip("[]"), port, type=socket.SOCK_STREAM):
            with socket.create_connection(sockaddr[:2], timeout=5) as s:
                assert s.recv(8) == P.NBDMAGIC.to_bytes(8, "big")
        with NbdClient.connect(srv.address, "") as c:
            c.write(0, b"tcp")
            assert c.read(0, 3) == b"tcp"


@pytest.mark.parametrize("addr", ["nbd:/x", "tcp:host:notaport", "tcp:localhost:70000", "udp:1"])
def test_bad_addresses_are_bad_input(store: Store, addr: str) -> None:
    with pytest.raises(BadInput):
        NbdServer(store, addr)


def test_refuses_to_clobber_a_file_or_a_live_socket(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("keep me")
    with pytest.raises(BadInput):
        NbdServer(store, f"unix:{f}").start()
    assert f.read_text() == "keep me"
    with NbdServer(store, f"unix:{tmp_path / 'a.sock'}"):
        with pytest.raises(BadInput):
            NbdServer(store, f"unix:{tmp_path / 'a.sock'}").start()


def test_stop_hangs_up_and_flushes(store: Store, tmp_path: Path) -> None:
    srv = NbdServer(store, f"unix:{tmp_path / 's.sock'}").start()
    c = connect(srv)
    c.write(0, b"data before stop")
    srv.stop()
    assert closed_by_server(c.sock)
    c.close()
    assert store.live.read(0, 16) == b"data before stop"
    assert not (tmp_path / "s.sock").exists()
    srv.stop()  # idempotent


def test_pipelined_max_size_reads_and_writes(tmp_path: Path) -> None:
    """32 MiB requests (the cap) back to back: the receive buffer grows to fit them, and replies
    beyond one pass's output budget (64 MiB) are sent after the first ones drain, in sync."""
    big = 64 * 1024 * 1024
    cap = 32 * 1024 * 1024
    with Store.create(tmp_path / "big.img", tmp_path / "bigstore", size=big) as s, NbdServer(s, "unix:") as srv:
        with connect(srv) as c:
            data = os.urandom(1024 * 1024) * 32
            c.write(0, data)
            blob = b"".join(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, (i % 2) * cap, cap) for i in range(3))
            blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 3, cap, 4) + b"tail"
            blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 4, cap, 4)
            c.sock.sendall(blob)
            for i in range(3):
                cookie, err, got = c.recv_reply(cap)
                assert (cookie, err) == (i, 0)
                assert got == (data if i % 2 == 0 else bytes(cap))
            assert c.recv_reply() == (3, 0, b"")
            assert c.recv_reply(4) == (4, 0, b"tail")


def test_big_write_batches_keep_request_order(server: NbdServer) -> None:
    """Write batches big enough for the worker thread: reads, flushes and DISC queued behind them
    see their data, and every reply comes back."""
    c = connect(server)
    blob = bytearray()
    chunks = {}
    for i in range(6):
        data = bytes([i + 1]) * (512 * 1024)
        chunks[i] = data
        blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, i, (i % 3) * 512 * 1024, len(data)) + data
        if i % 2:
            blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 100 + i, 0, 3 * 512 * 1024)
    blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, 200, 0, 0)
    blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 201, 0, 1 << 20) + b"\x77" * (1 << 20)
    blob += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 202, 0, 0)
    sender = threading.Thread(target=c.sock.sendall, args=(bytes(blob),))
    sender.start()
    got: dict[int, bytes] = {}
    for _ in range(6 + 3 + 2):
        cookie, err, _ = c.recv_reply()
        assert err == 0
        got[cookie] = c.recv_exact(3 * 512 * 1024) if cookie >= 100 and cookie < 200 else b""
    sender.join()
    assert closed_by_server(c.sock), "DISC closes after the last reply"
    c.close()
    assert got[101] == chunks[0] + chunks[1] + bytes(512 * 1024)
    assert got[103] == chunks[3] + chunks[1] + chunks[2]
    assert got[105] == chunks[3] + chunks[4] + chunks[5]
    with connect(server) as c2:
        assert c2.read(0, 1 << 20) == b"\x77" * (1 << 20), "the write just before DISC was applied"


def test_stop_during_big_writes_keeps_acknowledged_data(store: Store, tmp_path: Path) -> None:
    srv = NbdServer(store, f"unix:{tmp_path / 'b.sock'}").start()
    c = connect(srv)
    data = b"\x42" * (1 << 20)
    c.write(0, data)  # acknowledged: must survive stop()
    for i in range(1, 4):  # in flight while we stop
        c.send_request(P.CMD_WRITE, i << 20, 1 << 20, data)
    srv.stop()
    c.close()
    assert store.live.read(0, 1 << 20) == data


def test_serve_forever_in_callers_loop(store: Store, tmp_path: Path) -> None:
    """The asyncio entry: serve inside an existing loop; cancelling it hangs up and cleans up."""
    import asyncio

    async def main() -> None:
        srv = NbdServer(store, f"unix:{tmp_path / 'f.sock'}")
        await srv.listen()
        task = asyncio.create_task(srv.serve_forever())

        def client() -> bytes:
            with connect(srv) as c:
                c.write(0, b"in-loop")
                return c.read(0, 7)

        assert await asyncio.get_running_loop().run_in_executor(None, client) == b"in-loop"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not (tmp_path / "f.sock").exists()

    asyncio.run(main())
    assert store.live.read(0, 7) == b"in-loop"
