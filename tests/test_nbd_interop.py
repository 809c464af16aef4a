"""Real NBD clients against the NBD front end over a real Store: qemu-io, qemu-img, nbdinfo and
nbdcopy (libnbd), on the live export and on past exports (at=mark:NAME, at=seq:N)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rewind.engine.frontends.nbd.server import NbdServer
from rewind.engine.store import Store

SIZE = 64 * 1024 * 1024
K = 1024


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian: qemu-utils / libnbd-bin)")
    return path


def run(*cmd: str, ok: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    need(cmd[0])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def qemu_io(uri: str, *commands: str, fmt: bool = True, ok: bool = True, readonly: bool = False) -> str:
    args = ["qemu-io"] + (["-f", "raw"] if fmt else []) + (["-r"] if readonly else []) + [uri]
    for c in commands:
        args += ["-c", c]
    p = run(*args, ok=ok)
    out = p.stdout + p.stderr
    if ok:
        assert "Pattern verification failed" not in out, out
        assert "error" not in out.lower(), out
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.create(tmp_path / "disk.img", tmp_path / "store", size=SIZE)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def server(store: Store) -> Iterator[NbdServer]:
    with NbdServer(store, "unix:") as srv:  # private 0700 dir: short path, under 108 bytes
        yield srv


@pytest.mark.parametrize("fmt", [True, False], ids=["raw", "probed"])
def test_qemu_io_patterns_zero_discard(server: NbdServer, store: Store, fmt: bool) -> None:
    uri = server.uri
    qemu_io(
        uri,
        "write -P 0xab 4k 256k",
        "write -f -P 0xcd 300k 8k",  # FUA
        "write -z 64k 64k",
        "discard 128k 64k",
        "aio_write -P 0x5a 1m 4k",
        "aio_write -P 0x5b 2m 512k",
        "aio_flush",
        "flush",
        fmt=fmt,
    )
    qemu_io(
        uri,
        "read -P 0xab 4k 60k",
        "read -P 0 64k 128k",
        "read -P 0xab 192k 68k",
        "read -P 0xcd 300k 8k",
        "read -P 0x5a 1m 4k",
        "read -P 0x5b 2m 512k",
        "read -P 0 0 4k",
        fmt=fmt,
    )
    # the checks above would notice a wrong byte: prove qemu-io reports mismatches at all
    out = qemu_io(uri, "read -P 0x77 4k 4k", fmt=fmt, ok=False)
    assert "Pattern verification failed" in out
    assert store.live.read(4 * K, 4) == b"\xab" * 4
    assert store.live.read(64 * K, 128 * K) == bytes(128 * K)


def test_qemu_img_info_and_nbdinfo(server: NbdServer, store: Store) -> None:
    p = run("qemu-img", "info", "--output=json", server.uri)
    assert json.loads(p.stdout)["virtual-size"] == SIZE
    info = json.loads(run("nbdinfo", "--json", server.uri).stdout)
    ex = info["exports"][0]
    assert ex["export-size"] == SIZE
    assert ex["can_flush"] and ex["can_fua"] and ex["can_trim"] and ex["can_zero"]
    assert not ex["is_read_only"]
    assert ex["block_size_preferred"] == store.block_size
    assert ex["block_size_maximum"] == 32 * 1024 * 1024


def test_nbdinfo_list_shows_marks_and_past_export_is_read_only(server: NbdServer, store: Store) -> None:
    store.live.write(0, b"\x01" * 8192)
    store.mark("before")
    store.live.write(0, b"\x02" * 8192)
    store.mark("after")
    listing = json.loads(run("nbdinfo", "--list", "--json", server.uri).stdout)
    names = [e["export-name"] for e in listing["exports"]]
    assert names == ["", "at=mark:before", "at=mark:after"]
    past = {e["export-name"]: e for e in listing["exports"]}["at=mark:before"]
    assert past["is_read_only"] and not past["can_trim"] and past["export-size"] == SIZE
    text = run("nbdinfo", "--list", server.uri).stdout
    assert "at=mark:before" in text


def test_nbdcopy_live_and_past_exports(server: NbdServer, store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = bytearray(SIZE)
    for i in range(0, SIZE, 3 * 1024 * 1024 + 4096):  # scattered data with holes between
        data[i : i + 512 * K] = os.urandom(512 * K)
    src.write_bytes(data)
    # into the live export: nbdcopy uses several connections (we advertise multi-conn)
    run("nbdcopy", str(src), server.uri)
    seq_after_copy = store.head
    store.mark("copied")
    qemu_io(server.uri, "write -P 0xee 0 1m", "discard 8m 8m", "write -z 20m 1m")
    now = bytearray(data)
    now[0 : 1024 * K] = b"\xee" * (1024 * K)
    now[8 * 1024 * K : 16 * 1024 * K] = bytes(8 * 1024 * K)
    now[20 * 1024 * K : 21 * 1024 * K] = bytes(1024 * K)
    cases = {
        "": bytes(now),
        "at=mark:copied": bytes(data),
        f"at=seq:{seq_after_copy}": bytes(data),
        "at=seq:0": bytes(SIZE),
    }
    for name, want in cases.items():
        out = tmp_path / "out.img"
        run("nbdcopy", server.uri_for(name), str(out))
        got = out.read_bytes()
        assert got == want, f"export {name!r} differs"
        out.unlink()
    # a past export refuses to be written to, and stays readable
    bad = run("nbdcopy", str(src), server.uri_for("at=mark:copied"), ok=False)
    assert bad.returncode != 0
    out = qemu_io(server.uri_for("at=mark:copied"), "write -P 1 0 4k", ok=False)
    assert "denied" in out.lower() or "read-only" in out.lower() or "not permitted" in out.lower()
    assert "read 4096/4096" in qemu_io(server.uri_for("at=mark:copied"), "read 0 4k", readonly=True)
    qemu_io(server.uri_for("at=seq:0"), "read -P 0 0 1m", readonly=True)


def test_several_qemu_io_clients_at_once(server: NbdServer, store: Store) -> None:
    need("qemu-io")
    procs = []
    for k in range(6):
        base = k * 4 * 1024 * 1024
        cmds = []
        for i in range(16):
            cmds += ["-c", f"aio_write -P {k * 16 + i + 1} {base + i * 64 * K} 64k"]
        cmds += ["-c", "aio_flush"]
        procs.append(subprocess.Popen(["qemu-io", "-f", "raw", server.uri, *cmds],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
    for k in range(6):
        base = k * 4 * 1024 * 1024
        for i in range(16):
            assert store.live.read(base + i * 64 * K, 64 * K) == bytes([k * 16 + i + 1]) * (64 * K)


def test_unknown_export_is_refused_with_a_message(server: NbdServer) -> None:
    p = run("nbdinfo", server.uri_for("at=mark:nope"), ok=False)
    assert p.returncode != 0
    assert "nope" in p.stderr
    p = run("nbdinfo", server.uri_for("bogus"), ok=False)
    assert p.returncode != 0


def test_tcp_listener_with_qemu_io(store: Store) -> None:
    with NbdServer(store, "tcp:127.0.0.1:0") as srv:
        qemu_io(srv.uri, "write -P 0x42 0 64k", "read -P 0x42 0 64k")
    assert store.live.read(0, 3) == b"BBB"


def test_mark_names_with_spaces_and_punctuation_work_in_uris(server: NbdServer, store: Store, tmp_path: Path) -> None:
    store.live.write(0, b"x" * 4096)
    store.mark("two words:v1,a=b")
    store.live.write(0, b"y" * 4096)
    uri = server.uri_for("at=mark:two words:v1,a=b")
    assert "%20" in uri
    run("nbdcopy", uri, str(tmp_path / "o.img"))
    assert (tmp_path / "o.img").read_bytes()[:4096] == b"x" * 4096
    info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == SIZE
