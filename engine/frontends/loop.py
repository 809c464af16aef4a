"""Loop devices over the FUSE view's files: losetup as root, udisks2 as a desktop user.

The console calls these for "Attach as loop device" and "Open past point in file manager";
where neither route is available, `how_to()` says what the user can run instead.
A past point is opened through a throwaway overlay (FuseView.open_overlay), attached read-write
so the kernel may replay the filesystem's journal into the overlay, and mounted read-only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInput, RewindError

if TYPE_CHECKING:
    from .fuse import FuseView


class LoopError(RewindError):
    """A loop device could not be attached, mounted or detached (the message says why)."""


def _run(cmd: list[str], timeout: float = 30.0) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LoopError(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LoopError(f"{' '.join(cmd)} timed out") from None
    if p.returncode != 0:
        raise LoopError(f"{' '.join(cmd)} failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def losetup_available() -> bool:
    """Root with losetup and /dev/loop-control: we can attach loop devices ourselves."""
    return os.geteuid() == 0 and shutil.which("losetup") is not None and os.path.exists("/dev/loop-control")


def udisks_available() -> bool:
    """udisksctl is installed and the udisks2 daemon answers on the system bus."""
    if shutil.which("udisksctl") is None:
        return False
    try:
        p = subprocess.run(["udisksctl", "status"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def available() -> str | None:
    """Which route attach() will take: "losetup", "udisks" or None."""
    if losetup_available():
        return "losetup"
    if udisks_available():
        return "udisks"
    return None


def how_to(path: str | Path, read_only: bool = False) -> str:
    """What to run by hand (shown by the console where no route is available)."""
    ro = " -r" if read_only else ""
    ro_u = " --read-only" if read_only else ""
    return (
        f"To use {path} as a block device, run as root:  losetup --find --show{ro} {path}\n"
        f"or, as a desktop user with udisks2 installed:   udisksctl loop-setup{ro_u} -f {path}\n"
        "Without root or udisks2, serve the volume over NBD instead (rewind serve DIR --nbd ...)."
    )


@dataclass
class LoopDevice:
    """An attached loop device; detach() undoes attach()."""

    device: str
    backing: str
    read_only: bool
    via: str  # "losetup" | "udisks"
    mounts: list[Path] = field(default_factory=list)
    _tmpdirs: list[Path] = field(default_factory=list)

    def partitions(self) -> list[str]:
        """Partition devices (/dev/loopNpM) the kernel found on it, in order."""
        name = Path(self.device).name
        sysdir = Path("/sys/block") / name
        parts = sorted((p.name for p in sysdir.glob(f"{name}p*")), key=lambda s: int(s[len(name) + 1:] or 0))
        return [f"/dev/{p}" for p in parts]

    def mount(self, read_only: bool = True, options: str = "") -> list[Path]:
        """Mount its filesystem (or each partition's); returns the mount points."""
        targets = self.partitions() or [self.device]
        errors: list[str] = []
        for dev in targets:
            try:
                self.mounts.append(self._mount_one(dev, read_only, options))
            except LoopError as e:
                errors.append(str(e))
        if not self.mounts:
            raise LoopError("nothing on it could be mounted: " + "; ".join(errors))
        return list(self.mounts)

    def _mount_one(self, dev: str, read_only: bool, options: str) -> Path:
        opts = ",".join(o for o in (("ro" if read_only else ""), options) if o)
        if self.via == "udisks":
            out = _run(["udisksctl", "mount", "--no-user-interaction", "-b", dev] + (["-o", opts] if opts else []))
            m = re.search(r" at (.+?)\.?$", out.strip())
            if not m:
                raise LoopError(f"udisksctl mount said: {out.strip()}")
            return Path(m.group(1))
        mp = Path(tempfile.mkdtemp(prefix="rewind-mnt-"))
        try:
            _run(["mount"] + (["-o", opts] if opts else []) + [dev, str(mp)])
        except LoopError:
            mp.rmdir()
            raise
        self._tmpdirs.append(mp)
        return mp

    def unmount(self) -> None:
        """Unmount what mount() mounted (retrying briefly while busy)."""
        while self.mounts:
            mp = self.mounts[-1]
            for attempt in range(20):
                try:
                    if self.via == "udisks":
                        _run(["udisksctl", "unmount", "--no-user-interaction", "-p", str(mp)])
                    else:
                        _run(["umount", str(mp)])
                    break
                except LoopError:
                    if attempt == 19:
                        raise
                    time.sleep(0.1)
            self.mounts.pop()
            if mp in self._tmpdirs:
                self._tmpdirs.remove(mp)
                mp.rmdir()

    def detach(self) -> None:
        """Unmount, then detach the device. Safe to call twice."""
        self.unmount()
        if not self.device:
            return
        if self.via == "udisks":
            _run(["udisksctl", "loop-delete", "--no-user-interaction", "-b", self.device])
        else:
            for attempt in range(20):
                try:
                    _run(["losetup", "-d", self.device])
                    break
                except LoopError:
                    if attempt == 19:
                        raise
                    time.sleep(0.1)
        self.device = ""

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(path: str | Path, read_only: bool = False, partscan: bool = True) -> LoopDevice:
    """Attach `path` to a free loop device (losetup as root, else udisks2)."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p} does not exist: is the FUSE view mounted?")
    route = available()
    if route == "losetup":
        cmd = ["losetup", "--find", "--show"] + (["-r"] if read_only else []) + (["-P"] if partscan else [])
        dev = _run(cmd + [str(p)]).strip()
        return LoopDevice(dev, str(p), read_only, "losetup")
    if route == "udisks":
        cmd = ["udisksctl", "loop-setup", "--no-user-interaction", "-f", str(p)]
        out = _run(cmd + (["--read-only"] if read_only else []))
        m = re.search(r"(/dev/loop\d+)", out)
        if not m:
            raise LoopError(f"udisksctl loop-setup said: {out.strip()}")
        return LoopDevice(m.group(1), str(p), read_only, "udisks")
    raise LoopError("no way to attach a loop device here (not root, no udisks2).\n" + how_to(p, read_only))


def open_point(view: FuseView, point: str | int) -> LoopDevice:
    """Mount POINT for browsing: overlay file -> loop device -> read-only mount(s).

    The loop device is writable so that the kernel can replay a crash-consistent filesystem's
    journal; the writes land in the overlay and never in history. detach() undoes it all
    (the overlay stays until FuseView.close_overlay or stop).
    """
    path = view.open_overlay(point)
    dev = attach(path, read_only=False)
    try:
        dev.mount(read_only=True)
    except BaseException:
        dev.detach()
        raise
    return dev


def open_in_file_manager(directory: str | Path) -> None:
    """Show `directory` in the desktop's file manager (xdg-open, else gio open)."""
    for cmd in (["xdg-open", str(directory)], ["gio", "open", str(directory)]):
        if shutil.which(cmd[0]):
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            return
    raise LoopError(f"no xdg-open or gio to open a file manager; the files are in {directory}")


__all__ = ["LoopDevice", "LoopError", "attach", "available", "how_to", "losetup_available",
           "udisks_available", "open_point", "open_in_file_manager"]
