"""ext4 through a loop device through the FUSE view: the desktop path, end to end, real kernel.

mkfs.ext4 on /dev/loopN backed by MNT/live.img, mount, write files, mark with fsfreeze, write more
and mark without freezing (crash-consistent), delete everything, unmount; then the frozen mark
exports to an image that fsck.ext4 finds clean and holds the files intact, a past point mounts
read-only through a read-only loop device, and the crash-consistent mark mounts through a
throwaway overlay (the kernel replays the ext4 journal into the overlay, never into history).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rewind.engine.frontends import loop
from rewind.engine.frontends.freeze import frozen
from rewind.engine.frontends.fuse import FuseView
from rewind.engine.store import Store

SIZE = 64 << 20


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for losetup and mount"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "no /dev/fuse or fusermount3"
    for tool in ("losetup", "mkfs.ext4", "fsck.ext4", "debugfs", "fsfreeze", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not loop.losetup_available():
        return "no /dev/loop-control"
    p = subprocess.run(["losetup", "--find"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"no free loop device: {p.stderr.strip()}"
    return None


def sha_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree_sha(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file under root (lost+found left out)."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = sha_file(p)
    return out


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Store, FuseView, list[loop.LoopDevice]]]:
    why = _missing()
    if why:
        pytest.skip(why)
    store = Store.create(tmp_path / "disk.img", tmp_path / "store", size=SIZE)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    view = FuseView(store, mnt, scratch_dir=tmp_path / "scratch")
    devices: list[loop.LoopDevice] = []  # detached by the fixture even when the test fails
    try:
        view.start()
        yield store, view, devices
    finally:
        for d in reversed(devices):
            try:
                d.detach()
            except loop.LoopError as e:
                print("cleanup:", e)
        view.stop(lazy_if_busy=True)
        store.close()


def write_files(root: Path) -> None:
    (root / "docs").mkdir()
    (root / "docs" / "readme.txt").write_text("Rewind keeps every write.\n" * 50)
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(os.urandom(300_000))
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "small").mkdir()
    for i in range(12):
        (root / "small" / f"note{i:02d}.txt").write_bytes(os.urandom(100 + 997 * i))


def test_ext4_on_loop_on_fuse(env: tuple[Store, FuseView, list[loop.LoopDevice]], tmp_path: Path) -> None:
    store, view, devices = env
    dev = loop.attach(view.live_path)
    devices.append(dev)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev.device],
                   check=True)
    (mp,) = dev.mount(read_only=False)
    write_files(mp)
    files = tree_sha(mp)
    with frozen(mp):
        store.mark("files")

    # Crash-consistent point: more files, journal committed but the fs still mounted.
    (mp / "later.txt").write_text("written after the frozen mark\n")
    (mp / "docs" / "readme.txt").write_text("changed\n")
    os.sync()
    store.mark("crash")
    crash_files = tree_sha(mp)

    for name in list(os.listdir(mp)):
        if name != "lost+found":
            shutil.rmtree(mp / name) if (mp / name).is_dir() else (mp / name).unlink()
    os.sync()
    assert tree_sha(mp) == {}
    dev.detach()
    devices.remove(dev)

    # 1. Export the frozen mark: fsck.ext4 -n finds it clean, debugfs reads the files intact.
    out = tmp_path / "files.img"
    store.export("mark:files", out).run()
    fsck = subprocess.run(["fsck.ext4", "-fn", str(out)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dump = tmp_path / "dump"
    dump.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {dump}", str(out)], check=True, capture_output=True)
    restored = tree_sha(dump)
    assert restored == files
    print("\nrestored from mark:files (exported, fsck.ext4 -fn clean):")
    for name in sorted(restored):
        print(f"  {restored[name]}  {name}")

    # 2. The frozen mark as a read-only loop device on MNT/at/mark:files.img, mounted read-only.
    ro = loop.attach(view.point_path("mark:files"), read_only=True)
    devices.append(ro)
    (rmp,) = ro.mount(read_only=True)
    assert tree_sha(rmp) == files
    ro.detach()
    devices.remove(ro)

    # 3. The crash-consistent mark: a plain read-only loop usually cannot mount it (journal needs
    # replay); through a throwaway overlay it mounts, and history does not change.
    plain = loop.attach(view.point_path("mark:crash"), read_only=True)
    devices.append(plain)
    try:
        plain.mount(read_only=True)
        print("mark:crash on a read-only loop mounted anyway (kernel skipped the replay)")
    except loop.LoopError as e:
        print("mark:crash on a read-only loop, as expected, does not mount:", str(e).splitlines()[0][-90:])
    plain.detach()
    devices.remove(plain)
    crash_before = sha_file(store_export(store, "mark:crash", tmp_path / "crash1.img"))
    ov = loop.open_point(view, "mark:crash")
    devices.append(ov)
    got = tree_sha(ov.mounts[0])
    assert got == crash_files
    print(f"mark:crash mounted through {ov.backing}: {len(got)} files match, "
          f"overlay holds {view.overlays['mark:crash'].dirty_blocks} replayed blocks")
    ov.detach()
    devices.remove(ov)
    assert sha_file(store_export(store, "mark:crash", tmp_path / "crash2.img")) == crash_before


def store_export(store: Store, point: str, out: Path) -> Path:
    store.export(point, out).run()
    return out


def test_routes_and_bad_input(tmp_path: Path) -> None:
    """What the console shows where no loop route exists, and one-line errors for bad paths."""
    from rewind.engine.errors import BadInput
    from rewind.engine.frontends.freeze import FreezeError

    text = loop.how_to("/m/live.img", read_only=True)
    assert "losetup --find --show -r /m/live.img" in text
    assert "udisksctl loop-setup --read-only -f /m/live.img" in text
    assert loop.available() in ("losetup", "udisks", None)
    with pytest.raises(BadInput):
        loop.attach(tmp_path / "missing.img")
    with pytest.raises(BadInput):
        with frozen(tmp_path):  # a directory, not a mount point
            pass
    with pytest.raises(BadInput):
        with frozen(tmp_path / "nope"):
            pass
    if os.geteuid() == 0 and shutil.which("fsfreeze") and os.path.ismount("/proc"):
        with pytest.raises(FreezeError):  # procfs cannot be frozen: a clear error, nothing left frozen
            with frozen("/proc"):
                pass
