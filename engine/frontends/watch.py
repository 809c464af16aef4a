"""Watch mode: protect an image file that other programs change in place.

Nothing passes through us, so the engine cannot capture a block's old contents before its first
overwrite. We keep them ourselves: a shadow copy of the primary in the store directory (a reflink
where the filesystem can, else a sparse copy) and one xxh3_64 digest per block. On change events
(watchdog/inotify, coalesced) we stat the file, digest it in big chunks, and for each changed block
journal the new contents with the shadow's as the baseline (store.journal_external), then bring the
shadow and digests up to date. Honest granularity: one point per scan, not one per write.

Linux tells us that a file changed, never where, so an event costs a digest pass over the data
(holes are skipped with SEEK_DATA/SEEK_HOLE); the mtime+size check skips the pass when nothing
changed (at start, on polls).

Files in the store directory: watch-shadow.img, watch-digests.bin (little-endian uint64 per
block, then per 64 KiB group: a scan hashes groups and only the blocks of changed groups),
watch-state.json (what `log`/info() show: watching, since, last scan, ...).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from ..errors import BadInput, RewindError
from ..safefile import open_private

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger(__name__)

SHADOW = "watch-shadow.img"
DIGESTS = "watch-digests.bin"
STATE = "watch-state.json"
FICLONE = 0x40049409
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
CHUNK = 8 << 20
MAX_RUN = 1 << 20  # largest journal_external call
GROUP_BYTES = 64 << 10
RACY_NS = 2_000_000_000  # an mtime this close to a scan may hide a later write in the same tick


# --- copying -------------------------------------------------------------------------------
def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the data regions of a file; one extent covering all when unsupported."""
    out: list[tuple[int, int]] = []
    off = 0
    try:
        while off < size:
            try:
                data = os.lseek(fd, off, SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hole = min(os.lseek(fd, data, SEEK_HOLE), size)
            if hole > data:
                out.append((data, hole))
            off = hole
    except OSError:
        return [(0, size)]
    return out


def clone_file(src: str | Path, dst: str | Path) -> str:
    """Copy `src` to `dst` like `cp --reflink=auto --sparse=always`; returns the method used."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
                return "reflink"
            except OSError:
                pass
            os.ftruncate(dfd, size)
            method = "copy_file_range"
            for start, end in _data_extents(sfd, size):
                off = start
                while off < end:
                    n = 0
                    if method == "copy_file_range":
                        try:
                            n = os.copy_file_range(sfd, dfd, min(end - off, 1 << 30), off, off)
                        except OSError:
                            method = "sparse copy"
                    if method == "sparse copy":
                        buf = os.pread(sfd, min(end - off, CHUNK), off)
                        n = len(buf)
                        if buf.count(0) != n:
                            os.pwrite(dfd, buf, off)
                    if n <= 0:
                        break
                    off += n
            os.fsync(dfd)
            return method
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(open_private(tmp), "w") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def watch_info(store_dir: str | Path) -> dict[str, Any] | None:
    """What the store's info() / `rewind log` should say about watch mode; None when not watched.

    Keys: watching (a Watcher runs now), since_ns, last_scan_ns, scans, last_changed_blocks,
    block_size, shadow (path), mode ("watched": near-continuous, one point per change event).
    """
    p = Path(store_dir) / STATE
    try:
        st: dict[str, Any] = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    pid = st.get("pid")
    alive = False
    if st.get("watching") and isinstance(pid, int):
        try:
            os.kill(pid, 0)
            alive = True
        except OSError:
            alive = False
    return {
        "mode": "watched",
        "watching": alive,
        "since_ns": st.get("since_ns"),
        "last_scan_ns": st.get("last_scan_ns"),
        "scans": st.get("scans", 0),
        "last_changed_blocks": st.get("last_changed_blocks", 0),
        "block_size": st.get("block_size"),
        "shadow": str(Path(store_dir) / SHADOW),
    }


@dataclass
class ScanResult:
    """What one scan found: changed blocks, what it read, how long it took, the point it made."""

    changed_blocks: int
    bytes_read: int
    seconds: float
    skipped: bool  # mtime+size unchanged: no digest pass
    seq: int  # store.head after the scan


class Watcher:
    """Journal in-place changes to `store`'s primary file, found by block digests on events.

    prepare() makes the shadow and digests (a full pass) if missing; start() watches with
    watchdog and a worker thread (events coalesced over `debounce` s, at most `max_delay` s
    late); scan() is one pass, also callable directly. `poll` s: a cheap mtime+size check also
    runs that often (for filesystems without inotify); None disables it.
    """

    def __init__(self, store: Store, *, debounce: float = 0.1, max_delay: float = 1.0,
                 poll: float | None = 5.0, chunk: int = CHUNK,
                 on_scan: Callable[[ScanResult], None] | None = None) -> None:
        self.store = store
        self.primary = Path(store.primary_path).absolute()
        try:
            mode = os.stat(self.primary).st_mode
        except OSError as e:
            raise BadInput(f"cannot watch {self.primary}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise BadInput(f"watch mode needs a regular file; {self.primary} is not one "
                           "(serve a block device through NBD or FUSE instead)")
        self.dir = Path(store.dir)
        self.bs = int(store.block_size)
        self.size = int(store.size)
        self.nblocks = (self.size + self.bs - 1) // self.bs
        # Group digests (64 KiB) let a scan skip unchanged regions with few hash calls; block
        # digests say which blocks of a changed group changed.
        self.gbytes = max(self.bs, GROUP_BYTES)
        self.gblocks = self.gbytes // self.bs
        self.ngroups = (self.nblocks + self.gblocks - 1) // self.gblocks
        self.chunk = max(self.gbytes, chunk - chunk % self.gbytes)
        self.debounce = debounce
        self.max_delay = max_delay
        self.poll = poll
        self.on_scan = on_scan
        self.digests = array("Q")
        self.gdigests = array("Q")
        self.scans = 0
        self.last: ScanResult | None = None
        self._state: dict[str, Any] = {}
        self._zero_digest = xxhash.xxh3_64_intdigest(bytes(self.bs))
        self._zero_gdigests: dict[int, int] = {}
        self._scan_lock = threading.Lock()
        self._cv = threading.Condition()
        self._pending = False
        self._scanning = False
        self._last_kick = 0.0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._buf = bytearray(self.chunk)
        self.error: BaseException | None = None

    # --- persistent state ----------------------------------------------------------------
    @property
    def shadow_path(self) -> Path:
        return self.dir / SHADOW

    def _save_state(self, **kw: Any) -> None:
        self._state.update(kw)
        _atomic_json(self.dir / STATE, self._state)

    def _load(self) -> bool:
        """Load digests and state; False when they are missing or do not fit the shadow."""
        try:
            self._state = json.loads((self.dir / STATE).read_text())
        except (OSError, ValueError):
            self._state = {}
            return False
        if (self._state.get("block_size") != self.bs or self._state.get("size") != self.size
                or not self._state.get("digests_valid") or not self.shadow_path.exists()):
            return False
        raw = (self.dir / DIGESTS).read_bytes() if (self.dir / DIGESTS).exists() else b""
        if len(raw) != (self.nblocks + self.ngroups) * 8:
            return False
        d = array("Q")
        d.frombytes(raw)
        if sys.byteorder != "little":
            d.byteswap()
        self.digests = d[:self.nblocks]
        self.gdigests = d[self.nblocks:]
        return True

    def _save_digests(self) -> None:
        d = array("Q", self.digests)
        d.extend(self.gdigests)
        if sys.byteorder != "little":
            d.byteswap()
        tmp = self.dir / (DIGESTS + ".tmp")
        with open(open_private(tmp), "wb") as f:
            f.write(d.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / DIGESTS)

    def _digest_file(self, path: Path) -> tuple[array[int], array[int]]:
        """Block and group digests of `path` (zero-padded to the volume's size)."""
        out, gout = array("Q"), array("Q")
        h = xxhash.xxh3_64_intdigest
        bs, gb = self.bs, self.gbytes
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            for off in range(0, self.nblocks * bs, self.chunk):
                want = min(self.chunk, self.nblocks * bs - off)
                mv = self._read(fd, off, want)
                out.extend([h(mv[i:i + bs]) for i in range(0, want, bs)])
                gout.extend([h(mv[i:i + gb]) for i in range(0, want, gb)])
        return out, gout

    def _zero_gdigest(self, n: int) -> int:
        d = self._zero_gdigests.get(n)
        if d is None:
            d = self._zero_gdigests[n] = xxhash.xxh3_64_intdigest(bytes(n))
        return d

    def _read(self, fd: int, off: int, n: int) -> memoryview:
        """n bytes at off into the reusable buffer; past the end of the file reads as zeros."""
        mv = memoryview(self._buf)[:n]
        got = 0
        while got < n:
            k = os.preadv(fd, [mv[got:]], off + got)
            if k <= 0:
                break
            got += k
        if got < n:
            mv[got:] = bytes(n - got)
        return mv

    def _ensure_watch_mode(self) -> None:
        """Tell the store that others write the primary (it then trusts no holes; info() says so)."""
        set_mode = getattr(self.store, "set_mode", None)
        if callable(set_mode) and self.store.info().get("mode") != "watch":
            set_mode("watch")

    def prepare(self) -> str:
        """Make sure a shadow and digests that match each other exist; returns what was done."""
        self._ensure_watch_mode()
        if self._load():
            return "loaded"
        if self.shadow_path.exists() and self._state.get("block_size") in (None, self.bs):
            # Digests lost or stale (crash mid-update): the shadow is still the truth.
            self.digests, self.gdigests = self._digest_file(self.shadow_path)
            self._state.update(racy=True)
            how = "redigested"
        else:
            st0 = os.stat(self.primary)
            how = clone_file(self.primary, self.shadow_path)
            self.digests, self.gdigests = self._digest_file(self.shadow_path)
            self._state.update(mtime_ns=st0.st_mtime_ns, file_size=st0.st_size, racy=True)
        self._save_digests()
        self._save_state(version=1, block_size=self.bs, size=self.size, digests_valid=True,
                         created_by=how, scans=self._state.get("scans", 0))
        return how

    # --- scanning ------------------------------------------------------------------------
    def scan(self, quick: bool = False) -> ScanResult:
        """One pass: journal every block that differs from the shadow. quick: trust mtime+size."""
        with self._scan_lock:
            if not self.digests and self.nblocks:
                self.prepare()
            t0 = time.monotonic()
            scan_wall = time.time_ns()
            try:
                fd = os.open(self.primary, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise RewindError(f"cannot read the watched file {self.primary}: {e.strerror}") from None
            try:
                st = os.fstat(fd)
                same = (st.st_mtime_ns == self._state.get("mtime_ns")
                        and st.st_size == self._state.get("file_size") and not self._state.get("racy"))
                if quick and same:
                    res = ScanResult(0, 0, time.monotonic() - t0, True, int(self.store.head))
                    self.last = res
                    return res
                if st.st_size != self.size:
                    log.warning("%s is %d bytes, the volume %d: reading it zero-padded/cut",
                                self.primary, st.st_size, self.size)
                changed, nread = self._pass(fd, st.st_size)
            finally:
                os.close(fd)
            racy = scan_wall - st.st_mtime_ns < RACY_NS
            self.scans += 1
            seq = int(self.store.head)
            self._save_state(mtime_ns=st.st_mtime_ns, file_size=st.st_size, racy=racy,
                             last_scan_ns=scan_wall, scans=self._state.get("scans", 0) + 1,
                             last_changed_blocks=changed, last_seq=seq)
            res = ScanResult(changed, nread, time.monotonic() - t0, False, seq)
            self.last = res
        if self.on_scan is not None:
            self.on_scan(res)
        return res

    def _pass(self, fd: int, file_size: int) -> tuple[int, int]:
        """Digest the file chunk by chunk; journal, then shadow, the blocks that changed."""
        bs, gb, gbl = self.bs, self.gbytes, self.gblocks
        h = xxhash.xxh3_64_intdigest
        total = self.nblocks * bs
        extents = _data_extents(fd, min(file_size, total)) if file_size else []
        zd = self._zero_digest
        old = array("Q", self.digests)  # these become self.digests only once journaled
        gold = array("Q", self.gdigests)
        runs: list[list[Any]] = []  # [offset, bytearray of new data] of changed runs

        def add(off: int, data: bytes | memoryview) -> None:
            if runs and runs[-1][0] + len(runs[-1][1]) == off and len(runs[-1][1]) < MAX_RUN:
                runs[-1][1] += data
            else:
                runs.append([off, bytearray(data)])

        nread = 0
        ei = 0
        for off in range(0, total, self.chunk):
            end = min(off + self.chunk, total)
            b0, b1 = off // bs, (end + bs - 1) // bs
            g0, g1 = off // gb, (end + gb - 1) // gb
            while ei < len(extents) and extents[ei][1] <= off:
                ei += 1
            if not (ei < len(extents) and extents[ei][0] < end):  # a hole now: reads as zeros
                seg = old[b0:b1]
                if seg.count(zd) == len(seg):
                    continue
                for i, d in enumerate(seg):
                    if d != zd:
                        add((b0 + i) * bs, bytes(bs))
                        old[b0 + i] = zd
                for g in range(g0, g1):
                    gold[g] = self._zero_gdigest(min(gb, total - g * gb))
                continue
            n = end - off
            mv = self._read(fd, off, n)
            nread += n
            newg = array("Q", [h(mv[i:i + gb]) for i in range(0, n, gb)])
            if newg == gold[g0:g1]:
                continue
            for gi in range(len(newg)):
                if newg[gi] == gold[g0 + gi]:
                    continue
                gold[g0 + gi] = newg[gi]
                lo = gi * gbl  # block index within the chunk
                hi = min(lo + gbl, b1 - b0)
                for i in range(lo, hi):
                    d = h(mv[i * bs:(i + 1) * bs])
                    if d != old[b0 + i]:
                        old[b0 + i] = d
                        add((b0 + i) * bs, mv[i * bs:(i + 1) * bs])
        if not runs:
            return 0, nread
        self._commit([(o, bytes(d)) for o, d in runs], old, gold)
        return sum(len(d) for _, d in runs) // bs, nread

    def _commit(self, runs: list[tuple[int, bytes]], digests: array[int], gdigests: array[int]) -> None:
        """Journal (durably) first, then update the shadow: a crash in between re-journals."""
        sfd = os.open(self.shadow_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            items = []
            for off, data in runs:
                oldd = os.pread(sfd, len(data), off)
                if len(oldd) < len(data):
                    oldd += bytes(len(data) - len(oldd))
                items.append((off, data, oldd))
            self.store.journal_external_many(items)  # one journal append for the whole scan
            self.store.live.flush()
            self._save_state(digests_valid=False)
            for off, data in runs:
                os.pwrite(sfd, data, off)
            os.fdatasync(sfd)
        finally:
            os.close(sfd)
        self.digests, self.gdigests = digests, gdigests
        self._save_digests()
        self._save_state(digests_valid=True)

    # --- running -------------------------------------------------------------------------
    def kick(self) -> None:
        """Note a change (from an event); the worker scans once things are quiet."""
        with self._cv:
            self._pending = True
            self._last_kick = time.monotonic()
            self._cv.notify_all()

    def _worker(self) -> None:
        while True:
            with self._cv:
                deadline = None if self.poll is None else time.monotonic() + self.poll
                while not self._pending and not self._stop:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cv.wait(left)
                if self._stop:
                    return
                quick = not self._pending
                first = time.monotonic()
                while self._pending and not self._stop:
                    quiet_at = self._last_kick + self.debounce
                    now = time.monotonic()
                    if now >= quiet_at or now >= first + self.max_delay:
                        break
                    self._cv.wait(min(quiet_at, first + self.max_delay) - now)
                self._pending = False
                self._scanning = True
            try:
                self.scan(quick=quick)
            except Exception as e:  # keep watching; the console hears about it through .error
                self.error = e
                log.error("watch scan of %s failed: %s", self.primary, e)
            finally:
                with self._cv:
                    self._scanning = False
                    self._cv.notify_all()

    def start(self) -> Watcher:
        """prepare(), catch up with changes made while nobody watched, then watch."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        if self._thread is not None:
            return self
        self.prepare()
        self.scan(quick=True)
        target = str(self.primary)
        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write", "deleted"):
                    return
                paths = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
                if target in paths:
                    watcher.kick()

        self._stop = False
        self._observer = Observer()
        self._observer.schedule(_Handler(), str(self.primary.parent), recursive=False)
        self._observer.start()
        self._thread = threading.Thread(target=self._worker, name=f"watch:{self.primary.name}", daemon=True)
        self._thread.start()
        self._save_state(watching=True, pid=os.getpid(), since_ns=time.time_ns())
        return self

    def _stat_changed(self) -> bool:
        """The file's mtime or size differs from what the last scan saw."""
        try:
            st = os.stat(self.primary)
        except OSError:
            return False
        return (st.st_mtime_ns, st.st_size) != (self._state.get("mtime_ns"), self._state.get("file_size"))

    def wait_idle(self, timeout: float = 10.0, settle: float = 0.3) -> bool:
        """Wait until every change made before the call has been scanned (tests, CLI, console).

        Idle: no scan due or running, no event for `settle` s (events of writes made just before
        the call are still on their way), and the file's mtime and size are those the last scan
        saw (a change whose event got lost is scanned now).
        """
        start = time.monotonic()
        end = start + timeout
        with self._cv:
            while True:
                now = time.monotonic()
                quiet = now - max(self._last_kick, start) >= settle
                if not self._pending and not self._scanning and quiet:
                    if self._thread is None or not self._stat_changed():
                        return True
                    self._pending = True  # a change without an event: scan it
                    self._last_kick = now
                    self._cv.notify_all()
                if now >= end:
                    return False
                self._cv.wait(min(0.05, max(end - now, 0.001)))

    def stop(self) -> None:
        """Stop watching; a last scan catches changes that arrived since the previous one."""
        if self._thread is None:
            return
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
            self._observer = None
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(30)
        self._thread = None
        try:
            self.scan()
        finally:
            self._save_state(watching=False)

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Last scan and counters, JSON-able (for the console)."""
        return {"scans": self.scans, "last": asdict(self.last) if self.last else None,
                **(watch_info(self.dir) or {})}


def watch_protect(primary: str | Path, store_dir: str | Path, **create_kw: Any) -> Store:
    """`rewind protect FILE --watch`: create the store and take the shadow copy right away.

    Changes made between protect and the first `serve --watch` are then found (and journaled with
    the right baselines) when watching starts. Returns the open store.
    """
    from ..store import Store as _Store

    store = _Store.create(str(primary), store_dir, **create_kw)
    try:
        Watcher(store).prepare()
    except BaseException:
        store.close()
        raise
    return store


__all__ = ["Watcher", "ScanResult", "watch_protect", "watch_info", "clone_file", "SHADOW", "DIGESTS", "STATE"]
