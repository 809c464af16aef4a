"""The FUSE file view: the live volume and every past point as plain files.

Most desktop programs (and the loop driver) only know files. Mounted at MNT:

    MNT/live.img                 the live volume, read-write; every write goes through store.live
    MNT/at/mark:NAME.img         each mark, read-only (listed)
    MNT/at/POINT.img             any POINT asked for by name (-5m, seq:12, 2026-11-27T10:15:00, ...)
    MNT/at/POINT.rw.img          a throwaway writable overlay over POINT (for mounting a
                                 crash-consistent filesystem: the kernel may replay its journal)

The size of the files is the volume's size and cannot change (like a block device): truncate to
any other size fails with EPERM, so write with `dd conv=notrunc`. fsync and close (flush) make the
writes durable (in the journal; the primary follows lazily, and is synced at checkpoints and
close). Reads use the kernel page cache (no direct_io); past points are immutable so their cache
is kept across opens.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import mfusepy

from ..errors import BadInput, NoSpace, PointError, ReadOnlyError, RewindError
from .overlay import Overlay

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger(__name__)

LIVE = "live.img"
AT = "at"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MAX_WRITE = 1 << 20


class _Volume(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, off: int, n: int) -> bytes: ...


class FuseError(RewindError):
    """The view could not be mounted or unmounted (message says why and what to do)."""


def _oserror(e: BaseException) -> OSError:
    """Map an engine error to the errno a file system call should fail with."""
    if isinstance(e, ReadOnlyError):
        return OSError(errno.EROFS, str(e))
    if isinstance(e, NoSpace):
        return OSError(errno.ENOSPC, str(e))
    if isinstance(e, BadInput):
        return OSError(errno.EINVAL, str(e))
    return OSError(errno.EIO, str(e))


def point_name(name: str) -> tuple[str, bool] | None:
    """Split an at/ file name into (POINT, writable overlay?); None when it is not one of ours."""
    if name.endswith(".rw.img"):
        return name[: -len(".rw.img")], True
    if name.endswith(".img"):
        return name[: -len(".img")], False
    return None


class _Handle:
    """One open file: what it reads from and writes to."""

    __slots__ = ("vol", "kind", "dirty")

    def __init__(self, vol: Any, kind: str) -> None:
        self.vol = vol
        self.kind = kind  # "live" | "at" | "overlay"
        self.dirty = False  # written through this handle since its last flush


class _Ops(mfusepy.Operations):  # type: ignore[misc]
    """mfusepy callbacks (raw_fi: we set direct_io/keep_cache per open file)."""

    use_ns = True

    def __init__(self, view: FuseView) -> None:
        self._view = view
        self._store = view.store
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._lock = threading.Lock()
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._t0 = time.time_ns()
        self._live_mtime = self._t0
        self._seen: dict[str, int] = {}  # at/ name -> seq it meant at its last open

    # --- helpers --------------------------------------------------------------------------
    def _resolve(self, point: str) -> int:
        try:
            return int(self._store.resolve(point))
        except PointError as e:
            raise OSError(errno.ENOENT, str(e)) from None
        except RewindError as e:
            raise OSError(errno.ENOENT, str(e)) from None

    def _file_attrs(self, mode: int, size: int, mtime: int) -> dict[str, Any]:
        return {
            "st_mode": stat.S_IFREG | mode,
            "st_nlink": 1,
            "st_size": size,
            "st_uid": self._uid,
            "st_gid": self._gid,
            "st_mtime": mtime,
            "st_ctime": mtime,
            "st_atime": mtime,
            "st_blksize": 1 << 20,
            "st_blocks": (size + 511) // 512,
        }

    def _dir_attrs(self, mode: int) -> dict[str, Any]:
        return {
            "st_mode": stat.S_IFDIR | mode,
            "st_nlink": 2,
            "st_uid": self._uid,
            "st_gid": self._gid,
            "st_mtime": self._t0,
            "st_ctime": self._t0,
            "st_atime": self._t0,
        }

    def _split(self, path: str) -> tuple[str, bool] | None:
        if not path.startswith(f"/{AT}/") or path.count("/") != 2:
            return None
        return point_name(path[len(AT) + 2 :])

    # --- metadata -------------------------------------------------------------------------
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        if path == "/":
            return self._dir_attrs(0o755)
        if path == f"/{AT}":
            return self._dir_attrs(0o555)
        size = self._store.size
        if path == f"/{LIVE}":
            return self._file_attrs(0o644, size, self._live_mtime)
        parts = self._split(path)
        if parts is None:
            raise OSError(errno.ENOENT, path)
        point, rw = parts
        if rw and point in self._view.overlays:
            return self._file_attrs(0o644, size, self._t0)
        seq = self._resolve(point)
        try:
            t = self._store.point_time(seq)
        except Exception:
            t = self._t0
        return self._file_attrs(0o644 if rw else 0o444, size, t)

    def readdir(self, path: str, fh: Any) -> Iterator[str]:
        yield "."
        yield ".."
        if path == "/":
            yield LIVE
            yield AT
        elif path == f"/{AT}":
            for m in self._store.marks():
                if "/" not in m.name:
                    yield f"mark:{m.name}.img"
            yield from (f"{p}.rw.img" for p in list(self._view.overlays))
        else:
            raise OSError(errno.ENOTDIR, path)

    def statfs(self, path: str) -> dict[str, int]:
        bs = 4096
        blocks = (self._store.size + bs - 1) // bs
        return {"f_bsize": bs, "f_frsize": bs, "f_blocks": blocks, "f_bfree": 0, "f_bavail": 0,
                "f_files": 2, "f_ffree": 0, "f_namemax": 255}

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        if length == self._store.size:
            return 0
        raise OSError(errno.EPERM, "the volume's size is fixed: write with conv=notrunc")

    def chmod(self, path: str, mode: int) -> int:
        raise OSError(errno.EPERM, path)

    def chown(self, path: str, uid: int, gid: int) -> int:
        raise OSError(errno.EPERM, path)

    def utimens(self, path: str, times: Any = None) -> int:
        return 0

    # --- files ----------------------------------------------------------------------------
    def open(self, path: str, fi: Any) -> int:
        acc = fi.flags & os.O_ACCMODE
        if path == f"/{LIVE}":
            h = _Handle(self._store.live, "live")
            fi.keep_cache = 0
        else:
            parts = self._split(path)
            if parts is None:
                raise OSError(errno.ENOENT, path)
            point, rw = parts
            if rw:
                h = _Handle(self._view._overlay(point), "overlay")
                fi.keep_cache = 0
            else:
                if acc != os.O_RDONLY:
                    raise OSError(errno.EROFS, f"{path} is a past point and read-only; use {point}.rw.img")
                seq = self._resolve(point)
                view = self._store.at(seq)
                view.warm()  # its lookups start in the background
                h = _Handle(view, "at")
                if point.startswith(("seq:", "mark:")):
                    # Stable contents: keep the page cache across opens unless the name now
                    # means another seq (a mark removed and made again).
                    with self._lock:
                        fi.keep_cache = int(self._seen.get(point) == seq)
                        self._seen[point] = seq
                else:
                    # now, -5m, ISO times: the same name means newer contents later, and the
                    # kernel's page cache is per file, not per open: no caching.
                    fi.direct_io = 1
                    fi.keep_cache = 0
                    fi.fh = self._add(h)
                    return 0
        fi.direct_io = 0
        fi.fh = self._add(h)
        return 0

    def _add(self, h: _Handle) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = h
        return fh

    def _h(self, fi: Any) -> _Handle:
        try:
            return self._handles[fi.fh]
        except KeyError:
            raise OSError(errno.EBADF, "stale handle") from None

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        vol = self._h(fi).vol
        end = min(offset + size, vol.size)
        if offset >= end:
            return b""
        try:
            data: bytes = vol.read(offset, end - offset)
        except RewindError as e:
            log.error("read %s at %d: %s", path, offset, e)
            raise _oserror(e) from None
        return data

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        h = self._h(fi)
        if h.kind == "at":
            raise OSError(errno.EROFS, path)
        vol = h.vol
        n = len(data)
        if offset >= vol.size:
            raise OSError(errno.ENOSPC, "write past the end of the volume")
        if offset + n > vol.size:
            n = vol.size - offset
            data = data[:n]
        try:
            vol.write(offset, data)
        except RewindError as e:
            log.error("write %s at %d: %s", path, offset, e)
            raise _oserror(e) from None
        h.dirty = True
        if h.kind == "live":
            self._live_mtime = time.time_ns()
        return n

    def fallocate(self, path: str, mode: int, offset: int, length: int, fi: Any) -> int:
        """Punch hole (loop discard, fstrim) -> trim; zero range -> zero; plain allocate -> no-op."""
        h = self._h(fi)
        if h.kind == "at":
            raise OSError(errno.EROFS, path)
        vol = h.vol
        end = min(offset + length, vol.size)
        if mode & FALLOC_FL_PUNCH_HOLE or mode & FALLOC_FL_ZERO_RANGE:
            if end > offset:
                try:
                    (vol.trim if mode & FALLOC_FL_PUNCH_HOLE else vol.zero)(offset, end - offset)
                except RewindError as e:
                    raise _oserror(e) from None
                h.dirty = True
            return 0
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "unsupported fallocate mode")
        if offset + length > vol.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.ENOSPC, "the volume's size is fixed")
        return 0

    def _sync(self, fi: Any, always: bool) -> int:
        h = self._h(fi)
        if h.kind != "at" and (always or h.dirty):
            h.dirty = False
            try:
                h.vol.flush()
            except RewindError as e:
                h.dirty = True
                raise _oserror(e) from None
        return 0

    def flush(self, path: str, fi: Any) -> int:
        """close(): durable if this handle wrote (programs that only read pay nothing)."""
        return self._sync(fi, always=False)

    def fsync(self, path: str, datasync: int, fi: Any) -> int:
        return self._sync(fi, always=True)

    def release(self, path: str, fi: Any) -> int:
        with self._lock:
            self._handles.pop(fi.fh, None)
        return 0

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            # Attributes of live.img change with every write (mtime) but not its size.
            config.attr_timeout = 1.0
            config.entry_timeout = 1.0
            config.negative_timeout = 0.0
        # The struct fuse * of this mount, for cache invalidation from other threads.
        ctx = mfusepy._libfuse.fuse_get_context()
        self._view._fuse_ptr = ctx.contents.fuse if ctx else None
        self._view._ready.set()

    def destroy(self, path: str) -> None:
        self._view._ready.clear()
        self._view._fuse_ptr = None


_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _save_signals() -> dict[int, Any]:
    """The process's handlers before libfuse installs its own (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in _SIGNALS}


def _restore_signals(saved: dict[int, Any]) -> None:
    """Undo libfuse's handlers: it takes over signals left at SIG_DFL so that SIGTERM would only
    unmount the view and the process would live on. Ours (or the default) must decide."""
    for s, h in saved.items():
        if h is not None:
            signal.signal(s, h)


def _is_mount(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return True


def _stale(path: Path) -> bool:
    """A FUSE mount whose daemon died: stat fails with ENOTCONN."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def unmount(mountpoint: str | Path, lazy: bool = False) -> None:
    """Unmount a FUSE mount: fusermount3 -u (also works as a normal user), else umount(8)."""
    mnt = str(mountpoint)
    tools: list[list[str]] = []
    if shutil.which("fusermount3"):
        tools.append(["fusermount3", "-u"] + (["-z"] if lazy else []) + [mnt])
    if shutil.which("fusermount"):
        tools.append(["fusermount", "-u"] + (["-z"] if lazy else []) + [mnt])
    if os.geteuid() == 0 and shutil.which("umount"):
        tools.append(["umount"] + (["-l"] if lazy else []) + [mnt])
    last = "no fusermount3/umount found"
    for cmd in tools:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode == 0:
            return
        last = (p.stderr or p.stdout).strip()
    raise FuseError(f"cannot unmount {mnt}: {last}; detach loop devices and close programs using it")


class FuseView:
    """Mount the store's live volume and its past points as files under `mountpoint`.

    start() mounts in a background thread and returns once the kernel talks to us; stop()
    unmounts (fusermount3 -u) and waits for the thread. Also a context manager.
    threads=False (default) serves requests from one thread: the engine serializes writes
    anyway, and handing the GIL between libfuse's worker threads cost ~30% of write speed.
    """

    def __init__(self, store: Store, mountpoint: str | Path, *, allow_other: bool = False,
                 scratch_dir: str | Path | None = None, threads: bool = False) -> None:
        self.store = store
        self.mountpoint = Path(mountpoint).absolute()
        self.allow_other = allow_other
        self.threads = threads
        self._scratch_dir = Path(scratch_dir) if scratch_dir is not None else None
        self._own_scratch: Path | None = None
        self.overlays: dict[str, Overlay] = {}
        self._olock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ops: _Ops | None = None
        self._fuse_ptr: int | None = None

    # --- paths -------------------------------------------------------------------------------
    @property
    def live_path(self) -> Path:
        return self.mountpoint / LIVE

    def point_path(self, point: str | int) -> Path:
        """The read-only file for POINT (a seq number becomes seq:N)."""
        name = f"seq:{point}" if isinstance(point, int) else point
        self.store.resolve(name)  # PointError (exit 2) for a bad point, before anyone opens it
        return self.mountpoint / AT / f"{name}.img"

    # --- overlays ----------------------------------------------------------------------------
    def _scratch(self) -> Path:
        if self._scratch_dir is not None:
            self._scratch_dir.mkdir(parents=True, exist_ok=True)
            return self._scratch_dir
        if self._own_scratch is None:
            self._own_scratch = Path(tempfile.mkdtemp(prefix="rewind-overlay-"))
        return self._own_scratch

    def _overlay(self, point: str) -> Overlay:
        """The overlay named `point`, created (pinned to the point's seq now) on first use."""
        with self._olock:
            ov = self.overlays.get(point)
            if ov is None:
                try:
                    seq = self.store.resolve(point)
                except RewindError as e:
                    raise OSError(errno.ENOENT, str(e)) from None
                view = self.store.at(seq)
                safe = point.replace("/", "_")
                ov = Overlay(view, self._scratch() / f"{safe}.{seq}.scratch", self.store.block_size)
                self.overlays[point] = ov
            return ov

    def open_overlay(self, point: str | int) -> Path:
        """A writable throwaway file over POINT (writes never reach history); returns its path.

        Relative and ISO points are pinned to their seq (`seq:N.rw.img`) so that the name keeps
        meaning the same contents; marks and seq:N keep their names.
        """
        seq = self.store.resolve(point)
        if isinstance(point, str) and (point.startswith("mark:") or point.startswith("seq:")):
            name = point
        else:
            name = f"seq:{seq}"
        if "/" in name:
            raise BadInput(f"{name!r} cannot be a file name (it holds '/')")
        self._overlay(name)
        return self.mountpoint / AT / f"{name}.rw.img"

    def close_overlay(self, point: str) -> None:
        """Throw an overlay away (its scratch file is deleted). Unknown names are ignored."""
        with self._olock:
            ov = self.overlays.pop(point, None)
        if ov is not None:
            ov.close()

    # --- cache -------------------------------------------------------------------------------
    def invalidate(self, path: str = f"/{LIVE}") -> bool:
        """Drop the kernel's cached pages of a file (live.img after a rewind changed it under us).

        Reads of live.img use the page cache; writes through the view keep it right, but a rewind
        (or another front end writing) changes the volume behind the kernel's back.
        """
        ptr = self._fuse_ptr
        if ptr is None or not self.running:
            return False
        fn = mfusepy._libfuse.fuse_invalidate_path
        fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        fn.restype = ctypes.c_int
        return int(fn(ptr, path.encode())) == 0

    def _on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "rewind":
            self.invalidate()

    # --- lifecycle ---------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._ops is not None
        opts: dict[str, Any] = {
            "foreground": True,
            "nothreads": not self.threads,
            "max_idle_threads": 8,
            "raw_fi": True,
            "fsname": f"rewind:{self.store.dir}",
            "subtype": "rewind",
            "default_permissions": True,
        }
        if self.allow_other:
            opts["allow_other"] = True
        try:
            mfusepy.FUSE(self._ops, str(self.mountpoint), **opts)
        except BaseException as e:  # reported by start()/stop()
            self._error = e
        finally:
            self._ready.clear()

    def start(self, timeout: float = 15.0) -> FuseView:
        """Mount and return once the mount is live; FuseError (with the reason) otherwise."""
        if self._thread is not None:
            raise FuseError("the FUSE view is already running")
        mnt = self.mountpoint
        if _stale(mnt):
            unmount(mnt, lazy=True)
        if not mnt.is_dir():
            raise BadInput(f"mount point {mnt} is not a directory: create it first")
        if _is_mount(mnt):
            raise BadInput(f"{mnt} is already a mount point: pick an empty directory")
        if not os.path.exists("/dev/fuse"):
            raise FuseError("/dev/fuse is missing: load the fuse module or use the NBD front end")
        self._error = None
        self._ops = _Ops(self)
        saved = _save_signals()
        self._thread = threading.Thread(target=self._run, name=f"fuse:{mnt}", daemon=True)
        self._thread.start()
        add_listener = getattr(self.store, "add_listener", None)
        if callable(add_listener):
            add_listener(self._on_event)
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                err = self._error
                self._cleanup_thread()
                _restore_signals(saved)
                raise FuseError(f"cannot mount {mnt}: {err or 'timed out'}"
                                "; check /dev/fuse and fusermount3 (user_allow_other for allow_other)")
        _restore_signals(saved)
        return self

    def _cleanup_thread(self) -> None:
        remove_listener = getattr(self.store, "remove_listener", None)
        if callable(remove_listener):
            try:
                remove_listener(self._on_event)
            except (ValueError, KeyError):
                pass
        t = self._thread
        if t is not None and t.is_alive() and _is_mount(self.mountpoint):
            try:
                unmount(self.mountpoint, lazy=True)
            except FuseError:
                pass
            t.join(5)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def stop(self, timeout: float = 15.0, lazy_if_busy: bool = False) -> None:
        """Unmount and wait for the FUSE thread; flushes the live volume. Safe to call twice."""
        t = self._thread
        if t is None:
            return
        try:
            if t.is_alive() and _is_mount(self.mountpoint):
                try:
                    unmount(self.mountpoint)
                except FuseError:
                    if not lazy_if_busy:
                        raise
                    unmount(self.mountpoint, lazy=True)
            t.join(timeout)
            if t.is_alive():
                raise FuseError(f"the FUSE thread for {self.mountpoint} did not stop")
            self._cleanup_thread()
        finally:
            if self._thread is None:
                with self._olock:
                    ovs = list(self.overlays.values())
                    self.overlays.clear()
                for ov in ovs:
                    ov.close()
                if self._own_scratch is not None:
                    shutil.rmtree(self._own_scratch, ignore_errors=True)
                    self._own_scratch = None
                try:
                    self.store.live.flush()
                except RewindError as e:
                    log.error("flush after unmount: %s", e)

    def __enter__(self) -> FuseView:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(lazy_if_busy=True)


__all__ = ["FuseView", "FuseError", "unmount", "point_name", "LIVE", "AT"]
