"""Issue 13, trust nothing on the wire: what an NBD client (or a stranger) can make `rewind serve`
spend or do. Memory per connection and the connection cap, handshake timeouts, TCP beyond
loopback only when allowed and then under TLS (real clients: nbdinfo, qemu-io, qemu-img), the
peer-uid check on the unix socket, and client-triggered errors as short rate-limited lines.

Every `rewind serve` here is a subprocess whose PID we keep and stop (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rewind.engine.frontends.nbd import protocol as P
from rewind.engine.frontends.nbd.protocol import NbdClient, NbdError
from rewind.engine.frontends.nbd.server import NbdServer
from rewind.engine.store import Store

REWIND = [str(Path(sys.executable).with_name("rewind"))]
SIZE = 16 * 1024 * 1024
MiB = 1024 * 1024


# ---------------------------------------------------------------- helpers


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (packaging/system-deps.sh)")
    return path


def make_store(tmp_path: Path, size: int = SIZE) -> Path:
    d = tmp_path / "st"
    with Store.create(tmp_path / "disk.img", d, size=size):
        pass
    return d


class Serve:
    """`rewind serve ...` as a subprocess: its PID, ready line and stderr (a file: a full pipe
    would block the server on its own log)."""

    def __init__(self, tmp_path: Path, *argv: str) -> None:
        self.err_path = tmp_path / f"serve-{time.monotonic_ns()}.err"
        self._err = open(self.err_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*REWIND, "serve", *argv], stdout=subprocess.PIPE, stderr=self._err,
                                     text=True)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        self.ready = self.proc.stdout.readline().strip()
        if not self.ready.startswith("ready"):
            self.stop()
            raise AssertionError(f"serve did not get ready: {self.ready!r} {self.stderr()}")

    def rss(self) -> int:
        """VmRSS of the serve process, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stderr(self) -> str:
        return self.err_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._err.close()
        return int(self.proc.returncode)


@contextlib.contextmanager
def serving(tmp_path: Path, *argv: str) -> Iterator[Serve]:
    s = Serve(tmp_path, *argv)
    try:
        yield s
    finally:
        s.stop()


def run_rewind(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """A rewind command expected to exit by itself; one still running after `timeout` is killed
    by PID (and reported as rc None)."""
    p = subprocess.Popen([*REWIND, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return subprocess.CompletedProcess(p.args, -999, out, err)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def open_idle(path: str, n: int) -> tuple[list[socket.socket], int]:
    """`n` unix connections that read the greeting and then send nothing; (sockets, greeted)."""
    socks: list[socket.socket] = []
    greeted = 0
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)  # blocking: waits while the listen backlog is full
        s.settimeout(10)
        socks.append(s)
    for s in socks:
        try:
            got = s.recv(P.S_HANDSHAKE.size, socket.MSG_WAITALL)
        except OSError:
            got = b""
        if len(got) == P.S_HANDSHAKE.size:
            greeted += 1
    return socks, greeted


def closed_by_peer(s: socket.socket, wait: float) -> bool:
    r, _, _ = select.select([s], [], [], wait)
    if not r:
        return False
    try:
        return s.recv(1) == b""
    except OSError:
        return True


@pytest.fixture(autouse=True)
def _enough_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4096))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # serve inherits it
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------- 2. memory per connection


def test_rss_with_1000_idle_unix_connections(tmp_path: Path) -> None:
    """Must show: serve's RSS with 1,000 idle connections (cap raised to hold them all) and after
    they close. Before: 4 MiB buffer each up front, ~4 GiB held, 3.2 GiB kept after close."""
    st = make_store(tmp_path)
    sock = str(tmp_path / "n.sock")
    with serving(tmp_path, str(st), "--nbd", f"unix:{sock}", "--nbd-max-connections", "1000") as srv:
        time.sleep(0.5)
        base = srv.rss()
        socks, greeted = open_idle(sock, 1000)
        time.sleep(0.5)
        during = srv.rss()
        for s in socks:
            s.close()
        time.sleep(2.0)
        after = srv.rss()
        print(f"\nserve RSS: start {base / MiB:.1f} MiB, 1000 idle {during / MiB:.1f} MiB, "
              f"after close {after / MiB:.1f} MiB")
        assert greeted == 1000
        assert during < 200 * MiB, f"{during / MiB:.0f} MiB with 1000 idle connections"
        assert after < base + 32 * MiB, f"{after / MiB:.0f} MiB kept after they closed (start {base / MiB:.0f})"
        with NbdClient.connect(f"unix:{sock}") as c:  # and it still serves
            c.write(0, b"\x5a" * 4096)
            assert c.read(0, 4096) == b"\x5a" * 4096


def test_connection_cap_hangs_up_on_extra_clients(tmp_path: Path) -> None:
    """Default cap 128: the 129th client onwards is hung up on at once; freed slots are reused."""
    st = make_store(tmp_path)
    sock = str(tmp_path / "n.sock")
    with serving(tmp_path, str(st), "--nbd", f"unix:{sock}") as srv:
        socks, greeted = open_idle(sock, 200)
        assert greeted == 128, greeted
        assert "128 clients connected already" in srv.stderr()
        assert srv.stderr().count("\n") <= 12, srv.stderr()  # rate-limited: not one line per refusal
        for s in socks:
            s.close()
        time.sleep(0.5)
        with NbdClient.connect(f"unix:{sock}") as c:
            assert c.size == SIZE


def test_big_request_buffers_are_given_back(tmp_path: Path) -> None:
    """After 32 MiB writes on 8 connections the receive buffers shrink once the clients go quiet."""
    st = make_store(tmp_path, 2 * P.MAX_PAYLOAD)
    sock = str(tmp_path / "n.sock")
    with serving(tmp_path, str(st), "--nbd", f"unix:{sock}") as srv:
        base = srv.rss()
        clients = [NbdClient.connect(f"unix:{sock}") for _ in range(8)]
        big = b"\xa5" * P.MAX_PAYLOAD
        for c in clients:
            c.write(0, big)
        busy = srv.rss()
        time.sleep(3.0)  # quiet: the tidy tick shrinks every buffer to its first size
        quiet = srv.rss()
        print(f"\nserve RSS: start {base / MiB:.1f}, after 8x32 MiB writes {busy / MiB:.1f}, "
              f"3 s later {quiet / MiB:.1f} MiB (connections still open)")
        assert quiet < base + 64 * MiB, f"{quiet / MiB:.0f} MiB kept by 8 quiet connections"
        assert clients[0].read(0, 4096) == big[:4096]
        for c in clients:
            c.close()


def test_handshake_timeout_drops_clients_that_never_choose(tmp_path: Path) -> None:
    st = make_store(tmp_path)
    with Store.open(st) as store, NbdServer(store, "unix:", handshake_timeout=0.5) as srv:
        path = srv.address[5:]
        idle, _ = open_idle(path, 1)  # greeting read, then silence
        talky = NbdClient.connect(srv.address, export=None)  # options, but never GO
        talky.list_exports()
        done = NbdClient.connect(srv.address)  # in transmission: no handshake limit any more
        assert closed_by_peer(idle[0], 3.0)
        time.sleep(0.2)
        assert closed_by_peer(talky.sock, 3.0)
        time.sleep(1.0)
        assert done.read(0, 512) == bytes(512)
        assert srv.connections == 1
        idle[0].close()
        talky.close()
        done.close()


# ---------------------------------------------------------------- 3. TCP: loopback, or remote with TLS


@pytest.mark.parametrize("addr", ["tcp:0.0.0.0:0", "tcp:[::]:0"])
def test_non_loopback_tcp_is_refused(tmp_path: Path, addr: str) -> None:
    st = make_store(tmp_path)
    r = run_rewind("serve", str(st), "--nbd", addr)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--nbd-allow-remote" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_allow_remote_requires_tls(tmp_path: Path) -> None:
    st = make_store(tmp_path)
    r = run_rewind("serve", str(st), "--nbd", "tcp:0.0.0.0:0", "--nbd-allow-remote")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tls-cert" in lines[0], r.stderr


def test_nbd_server_api_refuses_non_loopback(tmp_path: Path) -> None:
    from rewind.engine.errors import BadInput

    st = make_store(tmp_path)
    with Store.open(st) as store:
        with pytest.raises(BadInput, match="--nbd-allow-remote"):
            NbdServer(store, "tcp:0.0.0.0:0").start()
        with NbdServer(store, "tcp:localhost:0") as srv:  # loopback stays allowed without TLS
            with NbdClient.connect(srv.address) as c:
                assert c.size == SIZE


def make_pki(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, a server certificate (localhost, 127.0.0.1, ::1) and a client certificate.
    Returns (server creds dir as for --tls-creds, client dir with a cert, client dir without)."""
    need("openssl")
    d.mkdir(mode=0o700)
    srv, cli, anon = d / "server", d / "client", d / "anon"
    for x in (srv, cli, anon):
        x.mkdir(mode=0o700)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ossl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=test CA")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        ossl("req", *ec, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        ossl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2", "-extfile", f"{who}.ext")
    for x in (srv, cli, anon):
        shutil.copy(d / "ca-cert.pem", x / "ca-cert.pem")
    for name in ("server-cert.pem", "server-key.pem"):
        shutil.copy(d / name, srv / name)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(d / name, cli / name)
    return srv, cli, anon


def ready_port(ready: str) -> int:
    uri = next(w for w in ready.split() if w.startswith("nbds://"))
    return int(uri.rsplit(":", 1)[1].split("/")[0])


def test_tls_with_real_clients(tmp_path: Path) -> None:
    """--tls-creds DIR (qemu's layout): nbdinfo, qemu-io and qemu-img over TLS with a client
    certificate; without TLS the options get NBD_REP_ERR_TLS_REQD; without a client cert the
    handshake fails."""
    for tool in ("nbdinfo", "qemu-io", "qemu-img"):
        need(tool)
    srv_dir, cli_dir, anon_dir = make_pki(tmp_path / "pki")
    st = make_store(tmp_path)
    with serving(tmp_path, str(st), "--nbd", "tcp:127.0.0.1:0", "--tls-creds", str(srv_dir)) as srv:
        port = ready_port(srv.ready)
        r = subprocess.run(["nbdinfo", "--json", f"nbds://localhost:{port}/?tls-certificates={cli_dir}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert '"export-size": 16777216' in r.stdout and '"TLS": true' in r.stdout, r.stdout
        obj = f"tls-creds-x509,id=tls0,dir={cli_dir},endpoint=client"
        opts = f"driver=raw,file.driver=nbd,file.host=localhost,file.port={port},file.tls-creds=tls0"
        r = subprocess.run(["qemu-io", "--object", obj, "--image-opts", opts, "-c", "write -P 0xab 64k 128k",
                            "-c", "read -P 0xab 64k 128k"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
        r = subprocess.run(["qemu-img", "info", "--object", obj, "--image-opts",
                            f"driver=nbd,host=localhost,port={port},tls-creds=tls0"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "16 MiB" in r.stdout, r.stdout + r.stderr

        # no TLS: every option but STARTTLS/ABORT is refused with TLS_REQD, EXPORT_NAME hangs up
        r = subprocess.run(["nbdinfo", f"nbd://localhost:{port}/"], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        with NbdClient.connect(f"tcp:127.0.0.1:{port}", export=None) as c:
            with pytest.raises(NbdError) as e:
                c.go("")
            assert e.value.code == P.REP_ERR_TLS_REQD
            with pytest.raises(NbdError) as e:
                c.list_exports()
            assert e.value.code == P.REP_ERR_TLS_REQD
            c.send_option(P.OPT_EXPORT_NAME, b"")
            assert closed_by_peer(c.sock, 5.0)
        # TLS but no client certificate: ca-cert.pem in --tls-creds means clients must show one
        r = subprocess.run(["nbdinfo", f"nbds://localhost:{port}/?tls-certificates={anon_dir}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        r = subprocess.run(["nbdinfo", "--size", f"nbds://localhost:{port}/?tls-certificates={cli_dir}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr  # and it still serves
    # the data written over TLS is in the store
    with Store.open(st) as store:
        assert store.live.read(64 * 1024, 128 * 1024) == b"\xab" * 128 * 1024


def test_remote_allowed_with_tls(tmp_path: Path) -> None:
    """--nbd-allow-remote with TLS listens on 0.0.0.0; a TLS client gets in, a plain one does not."""
    need("nbdinfo")
    srv_dir, cli_dir, _anon = make_pki(tmp_path / "pki")
    st = make_store(tmp_path)
    with serving(tmp_path, str(st), "--nbd", "tcp:0.0.0.0:0", "--nbd-allow-remote",
                 "--tls-cert", str(srv_dir / "server-cert.pem"), "--tls-key", str(srv_dir / "server-key.pem"),
                 "--tls-ca", str(srv_dir / "ca-cert.pem")) as srv:
        port = ready_port(srv.ready)
        r = subprocess.run(["nbdinfo", "--size", f"nbds://localhost:{port}/?tls-certificates={cli_dir}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stdout + r.stderr
        with NbdClient.connect(f"tcp:127.0.0.1:{port}", export=None) as c:
            with pytest.raises(NbdError) as e:
                c.go("")
            assert e.value.code == P.REP_ERR_TLS_REQD


def test_tls_options_are_checked(tmp_path: Path) -> None:
    st = make_store(tmp_path)
    for extra, word in ((["--tls-cert", "/nonexistent.pem"], "--tls-key"),
                        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "nonexistent"),
                        (["--tls-creds", str(tmp_path / "nodir")], "--tls-creds")):
        r = run_rewind("serve", str(st), "--nbd", "tcp:127.0.0.1:0", *extra)
        assert r.returncode == 2, (extra, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr


# ---------------------------------------------------------------- 5. peer uid on the unix socket


def test_unix_socket_refuses_other_users(tmp_path: Path) -> None:
    """Even with the socket's mode opened up by mistake, another uid gets no greeting."""
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    st = make_store(tmp_path)
    d = Path(f"/tmp/rewind-peer-{os.getpid()}")
    d.mkdir(mode=0o755)
    try:
        os.chmod(d, 0o755)
        path = str(d / "n.sock")
        with Store.open(st) as store, NbdServer(store, f"unix:{path}") as srv:
            os.chmod(path, 0o666)  # the mistake
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: become nobody, connect, report how many greeting bytes came
                got = b""
                try:
                    os.close(r)
                    os.setgid(65534)
                    os.setuid(65534)
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(5)
                    s.connect(path)
                    got = s.recv(P.S_HANDSHAKE.size, socket.MSG_WAITALL)
                except OSError:
                    pass
                finally:
                    os.write(w, struct.pack(">i", len(got)))
                    os._exit(0)
            os.close(w)
            n = struct.unpack(">i", os.read(r, 4))[0]
            os.close(r)
            os.waitpid(pid, 0)
            assert n == 0, "another user got the NBD greeting"
            with NbdClient.connect(srv.address) as c:  # our own user still gets in
                assert c.size == SIZE
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- 13. client-triggered log lines


def test_bad_export_names_log_little(tmp_path: Path) -> None:
    """5,000 INFO options naming an export that makes the engine raise (not a BadInput) each get an
    error reply; serve's stderr grows by at most a few short lines, no traceback."""
    st = make_store(tmp_path)
    sock = str(tmp_path / "n.sock")
    name = "at=-" + "9" * 4000 + "s"  # a relative time too large for a float (OverflowError before)
    with serving(tmp_path, str(st), "--nbd", f"unix:{sock}") as srv:
        with NbdClient.connect(f"unix:{sock}", export=None) as c:
            for _ in range(5000):
                with pytest.raises(NbdError) as e:
                    c.info(name)
                assert e.value.code in (P.REP_ERR_INVALID, P.REP_ERR_UNKNOWN)  # UNKNOWN once points.py says so
            c.go("")  # the connection is still fine
            assert c.size == SIZE
        err = srv.stderr()
        print(f"\nserve stderr after 5000 bad INFO options: {len(err)} bytes, {err.count(chr(10))} lines")
        assert "Traceback" not in err
        assert len(err) < 4096, err[:2000]
        assert all(len(line) <= 300 for line in err.splitlines())


def test_line_limiter_counts_what_it_leaves_out(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from rewind.engine.frontends.nbd.server import LineLimiter

    now = [0.0]
    lim = LineLimiter(logging.getLogger("rewind.test-limit"), burst=3, window=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="rewind.test-limit"):
        for i in range(100):
            lim(logging.WARNING, "bad thing %d %s", i, "x" * 1000)
        assert len(caplog.records) == 3
        assert all(len(r.getMessage()) <= 300 for r in caplog.records)
        now[0] = 61.0
        lim(logging.WARNING, "later")
    msgs = [r.getMessage() for r in caplog.records]
    assert "97 more such lines" in msgs[3] and msgs[4] == "later"
