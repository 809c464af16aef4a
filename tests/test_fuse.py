"""The FUSE file view, driven by real programs (dd, fio, fallocate) through the kernel."""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rewind.engine.errors import BadInput, PointError
from rewind.engine.frontends.fuse import FuseView
from rewind.engine.store import Store

SIZE = 64 << 20


def fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e.strerror}"
    return None


@pytest.fixture
def fview(tmp_path: Path) -> Iterator[tuple[Store, FuseView]]:
    why = fuse_missing()
    if why:
        pytest.skip(why)
    store = Store.create(tmp_path / "disk.img", tmp_path / "store", size=SIZE)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    view = FuseView(store, mnt)
    try:
        view.start()
        yield store, view
    finally:
        view.stop(lazy_if_busy=True)
        store.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def export_sha(store: Store, point: str | int, out: Path) -> str:
    store.export(point, out).run()
    return file_sha(out)


def test_layout_names_and_errors(fview: tuple[Store, FuseView]) -> None:
    store, view = fview
    mnt = view.mountpoint
    assert sorted(os.listdir(mnt)) == ["at", "live.img"]
    assert os.stat(mnt / "live.img").st_size == SIZE
    store.live.write(0, b"A" * 4096)
    store.mark("first")
    assert os.listdir(mnt / "at") == ["mark:first.img"]
    # Any point asked for by name resolves, read-only.
    for name in ("mark:first", "seq:1", "now", "-5m"):
        p = mnt / "at" / f"{name}.img"
        if name == "-5m":  # before the store existed: before the horizon
            with pytest.raises(FileNotFoundError):
                os.stat(p)
            continue
        assert os.stat(p).st_size == SIZE
    with open(mnt / "at" / "mark:first.img", "rb") as f:
        assert f.read(4096) == b"A" * 4096
    # Bad names: ENOENT; writes to a past point: EROFS; size is fixed: EPERM.
    for bad in ("mark:nope.img", "seq:999.img", "yesterday.img", "mark:first.txt", "x/y.img"):
        with pytest.raises(OSError) as ei:
            os.stat(mnt / "at" / bad)
        assert ei.value.errno in (errno.ENOENT, errno.ENOTDIR)
    with pytest.raises(OSError) as ei:
        open(mnt / "at" / "mark:first.img", "r+b")
    assert ei.value.errno == errno.EROFS
    with pytest.raises(OSError) as ei:
        os.truncate(mnt / "live.img", 0)
    assert ei.value.errno == errno.EPERM
    with open(mnt / "live.img", "r+b", buffering=0) as f:
        f.seek(SIZE - 2)
        assert f.write(b"xyz") == 2  # cut at the end of the volume
        with pytest.raises(OSError) as ei:
            f.write(b"more")
        assert ei.value.errno == errno.ENOSPC
    with pytest.raises(PointError):
        view.point_path("mark:nope")
    with pytest.raises(BadInput):
        view.open_overlay("2026-13-45T99:00:00")


def test_dd_and_fio_then_exports_compared(fview: tuple[Store, FuseView], tmp_path: Path) -> None:
    store, view = fview
    live = view.live_path
    src = tmp_path / "random.bin"
    src.write_bytes(os.urandom(8 << 20))
    refs: dict[str, str] = {}

    # dd: big buffered writes, then unaligned-offset small ones, then O_DIRECT where FUSE allows it.
    subprocess.run(["dd", f"if={src}", f"of={live}", "bs=1M", "seek=3", "conv=notrunc,fsync", "status=none"],
                   check=True)
    subprocess.run(["dd", f"if={src}", f"of={live}", "bs=777", "count=100", "skip=5", "seek=50001",
                    "conv=notrunc", "status=none"], check=True)
    direct = subprocess.run(["dd", f"if={src}", f"of={live}", "bs=64k", "count=16", "seek=700",
                             "oflag=direct", "conv=notrunc", "status=none"], capture_output=True, text=True)
    print("dd oflag=direct:", "ok" if direct.returncode == 0 else direct.stderr.strip())
    store.mark("after-dd")
    store.flush(primary=True)  # the primary itself is the reference (the applier is lazy)
    refs["after-dd"] = file_sha(Path(store.primary_path))
    assert file_sha(live) == refs["after-dd"]

    # fio, psync engine: random 4k..64k writes, verified by reading back through the view.
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    fio = subprocess.run(
        ["fio", "--name=w", f"--filename={live}", "--rw=randwrite", "--bsrange=4k-64k", "--size=8M",
         "--offset=40M", "--ioengine=psync", "--iodepth=1", "--randrepeat=0", "--refill_buffers",
         "--verify=crc32c", "--do_verify=1", "--end_fsync=1", "--output-format=terse"],
        capture_output=True, text=True, timeout=120)
    assert fio.returncode == 0, fio.stderr
    store.mark("after-fio")
    store.flush(primary=True)  # the primary itself is the reference (the applier is lazy)
    refs["after-fio"] = file_sha(Path(store.primary_path))

    # Overwrite everything dd wrote: the marks must still export what was there.
    subprocess.run(["dd", "if=/dev/zero", f"of={live}", "bs=1M", "count=64", "conv=notrunc,fsync",
                    "status=none"], check=True)
    for name, ref in refs.items():
        assert export_sha(store, f"mark:{name}", tmp_path / f"{name}.img") == ref
        assert file_sha(view.mountpoint / "at" / f"mark:{name}.img") == ref
    assert file_sha(live) == sha(bytes(SIZE))


def test_fallocate_punch_and_zero(fview: tuple[Store, FuseView]) -> None:
    if shutil.which("fallocate") is None:
        pytest.skip("util-linux fallocate is not installed")
    store, view = fview
    store.live.write(1 << 20, os.urandom(1 << 20))
    store.mark("full")
    subprocess.run(["fallocate", "-p", "-o", str(1 << 20), "-l", "65536", str(view.live_path)], check=True)
    subprocess.run(["fallocate", "-z", "-o", str((1 << 20) + 131072), "-l", "4096", str(view.live_path)],
                   check=True)
    assert store.live.read(1 << 20, 65536) == bytes(65536)
    assert store.live.read((1 << 20) + 131072, 4096) == bytes(4096)
    assert store.at("mark:full").read(1 << 20, 65536) != bytes(65536)


def test_overlay_writes_never_reach_history(fview: tuple[Store, FuseView], tmp_path: Path) -> None:
    store, view = fview
    data = os.urandom(1 << 20)
    store.live.write(0, data)
    store.mark("m")
    head = store.head
    before = export_sha(store, "mark:m", tmp_path / "before.img")
    rw = view.open_overlay("mark:m")
    assert rw.name == "mark:m.rw.img" and rw.name in os.listdir(view.mountpoint / "at")
    with open(rw, "r+b", buffering=0) as f:
        f.seek(10)
        f.write(b"scribble")
        f.seek(8190)
        f.write(b"xyzw")  # across a block boundary
        os.fsync(f.fileno())
        f.seek(0)
        got = f.read(1 << 20)
    want = bytearray(data)
    want[10:18] = b"scribble"
    want[8190:8194] = b"xyzw"
    assert got == bytes(want)
    assert store.head == head
    assert export_sha(store, "mark:m", tmp_path / "after.img") == before
    assert file_sha(view.mountpoint / "at" / "mark:m.img") == before
    # Relative points are pinned to a seq name.
    assert view.open_overlay("now").name == f"seq:{store.head}.rw.img"
    view.close_overlay("mark:m")
    assert "mark:m.rw.img" not in os.listdir(view.mountpoint / "at")


def test_stop_is_clean_and_restartable(tmp_path: Path) -> None:
    why = fuse_missing()
    if why:
        pytest.skip(why)
    store = Store.create(tmp_path / "disk.img", tmp_path / "store", size=1 << 20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        with FuseView(store, mnt) as v:
            with open(v.live_path, "r+b") as f:
                f.write(b"hello")
            with pytest.raises(BadInput):
                FuseView(store, mnt).start()  # already a mount point
        assert not os.path.ismount(mnt)
        assert store.live.read(0, 5) == b"hello"
        v2 = FuseView(store, mnt).start()
        v2.stop()
        v2.stop()
        assert not os.path.ismount(mnt)
    finally:
        store.close()


def test_normal_user_mount(tmp_path: Path) -> None:
    """As a normal user (nobody), through setuid fusermount3."""
    why = fuse_missing()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to switch to an unprivileged user")

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    os.chmod(tmp_path, 0o777)
    work = tmp_path / "u"
    work.mkdir()
    os.chown(work, nobody.pw_uid, nobody.pw_gid)

    probe = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", "import rewind.engine"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("user nobody cannot run this Python (interpreter or venv under a private home): "
                    + probe.stderr.strip()[-120:])
    script = (
        "import os,sys\n"
        "from rewind.engine.store import Store\n"
        "from rewind.engine.frontends.fuse import FuseView\n"
        "w=sys.argv[1]; os.mkdir(w+'/mnt')\n"
        "s=Store.create(w+'/disk.img', w+'/store', size=1<<20)\n"
        "with FuseView(s, w+'/mnt') as v:\n"
        "    open(v.live_path,'r+b').write(b'user')\n"
        "    s.mark('u')\n"
        "    print(open(v.mountpoint/'at'/'mark:u.img','rb').read(4).decode())\n"
        "print(os.path.ismount(w+'/mnt'))\n"
        "s.close()\n"
    )
    p = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", script, str(work)],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0 and ("Permission denied" in p.stderr and "fuse" in p.stderr.lower()):
        pytest.skip(f"this machine does not let normal users mount FUSE: {p.stderr.strip()[-200:]}")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["user", "False"]


def test_rewind_drops_stale_page_cache(fview: tuple[Store, FuseView]) -> None:
    store, view = fview
    store.live.write(0, b"1" * 8192)
    store.mark("ones")
    with open(view.live_path, "r+b", buffering=0) as f:
        f.write(b"2" * 8192)
        f.seek(0)
        assert f.read(8192) == b"2" * 8192  # now in the kernel's page cache
        store.rewind("mark:ones").run()
        f.seek(0)
        assert f.read(8192) == b"1" * 8192


def test_moving_names_are_not_served_from_a_stale_cache(fview: tuple[Store, FuseView]) -> None:
    """at/now.img means newer contents after each write; at/seq:N.img never changes."""
    store, view = fview
    now = view.mountpoint / "at" / "now.img"
    store.live.write(0, b"a" * 4096)
    first = store.head
    with open(now, "rb", buffering=0) as f:
        assert f.read(4096) == b"a" * 4096
    store.live.write(0, b"b" * 4096)
    with open(now, "rb", buffering=0) as f:
        assert f.read(4096) == b"b" * 4096
    with open(view.point_path(first), "rb", buffering=0) as f:
        assert f.read(4096) == b"a" * 4096


def test_sigterm_still_belongs_to_the_program(tmp_path: Path) -> None:
    """libfuse takes over SIGTERM when it is at SIG_DFL; FuseView gives it back, so a plain
    program still dies on SIGTERM (and a stale mount is cleaned up by the next start)."""
    why = fuse_missing()
    if why:
        pytest.skip(why)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        "import sys,time\n"
        "from rewind.engine.store import Store\n"
        "from rewind.engine.frontends.fuse import FuseView\n"
        "s=Store.create(sys.argv[1]+'/d.img', sys.argv[1]+'/st', size=1<<20)\n"
        "FuseView(s, sys.argv[1]+'/mnt').start()\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
        "print('survived', flush=True)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        p.terminate()
        assert p.wait(10) == -15
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    store = Store.open(tmp_path / "st")
    try:
        with FuseView(store, mnt) as v:  # over the stale mount the killed process left
            assert v.live_path.stat().st_size == 1 << 20
    finally:
        store.close()
    assert not os.path.ismount(mnt)
