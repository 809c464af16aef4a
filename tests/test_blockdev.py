"""A block device as the primary volume: /dev/loopN over a plain file, protected in place."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rewind.engine.frontends import loop
from rewind.engine.frontends.fuse import FuseView
from rewind.engine.store import Store

SIZE = 16 << 20


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if not loop.losetup_available():
        pytest.skip("needs root, losetup and /dev/loop-control to make a block device")
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))  # some data that was there before protection started
    try:
        dev = loop.attach(backing, partscan=False)
    except loop.LoopError as e:
        pytest.skip(f"no loop device: {e}")
    try:
        yield dev.device, backing
    finally:
        dev.detach()


def dev_read(dev: str, off: int, n: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def test_protect_a_loop_device(loopdev: tuple[str, Path], tmp_path: Path) -> None:
    dev, backing = loopdev
    original = backing.read_bytes()
    store = Store.create(dev, tmp_path / "store")
    try:
        assert store.size == SIZE  # from BLKGETSIZE64
        assert store.primary_path == dev
        model = bytearray(original)
        a = os.urandom(3 << 20)
        store.live.write(512 << 10, a)  # over the pre-existing data: baselines needed
        model[512 << 10:(512 << 10) + len(a)] = a
        store.flush(primary=True)  # the primary holds every write now (the applier is lazy)
        assert dev_read(dev, 512 << 10, len(a)) == a
        store.mark("a")
        at_a = bytes(model)
        store.live.zero(0, 4 << 20)
        store.live.write(SIZE - 4096, b"z" * 4096)
        model[0:4 << 20] = bytes(4 << 20)
        model[SIZE - 4096:] = b"z" * 4096
        store.live.flush()

        out = tmp_path / "a.img"
        store.export("mark:a", out).run()
        assert out.read_bytes() == at_a
        store.export(0, tmp_path / "start.img").run()
        assert (tmp_path / "start.img").read_bytes() == original
        store.flush(primary=True)
        assert dev_read(dev, 0, SIZE) == bytes(model)

        store.rewind("mark:a").run()
        assert dev_read(dev, 0, SIZE) == at_a
    finally:
        store.close()


def test_block_device_through_fuse(loopdev: tuple[str, Path], tmp_path: Path) -> None:
    """The engine writes to a device through the front ends like it writes to a file."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("no /dev/fuse or fusermount3")
    dev, _ = loopdev
    store = Store.create(dev, tmp_path / "store")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(2 << 20))
    try:
        with FuseView(store, mnt) as view:
            subprocess.run(["dd", f"if={src}", f"of={view.live_path}", "bs=1M", "seek=5",
                            "conv=notrunc,fsync", "status=none"], check=True)
            store.mark("dd")
        store.flush(primary=True)  # the lazy applier puts every write on the device
        assert dev_read(dev, 5 << 20, 2 << 20) == src.read_bytes()
        store.live.write(5 << 20, bytes(2 << 20))
        assert hashlib.sha256(store.at("mark:dd").read(5 << 20, 2 << 20)).digest() == \
            hashlib.sha256(src.read_bytes()).digest()
    finally:
        store.close()
