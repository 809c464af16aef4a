"""The demo: a small disk image with a real FAT filesystem, protected from its first byte, and a
workload that keeps creating, editing and deleting files in it, so that the console's charts and
timeline come alive within seconds. Needs no root: the filesystem is written by pyfatfs through
the engine's live volume (every write journaled), never mounted.

No Qt here; the console runs DemoWorkload in its own thread and reads its log to check previews.
"""

from __future__ import annotations

import datetime as _dt
import io
import random
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

DEMO_SIZE = 64 * 1024 * 1024
PRIMARY_NAME = "demo-disk.img"
STORE_NAME = "history"
DEMO_MARK = re.compile(r"demo-(\d+)-\d+-files")  # the workload's marks (engine.store.AUTO_MARK)


def demo_root() -> Path:
    """Where demo protections live: <user data dir>/rewind/demo (XDG_DATA_HOME is honoured)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("rewind")) / "demo"


class LiveFile(io.RawIOBase):
    """A seekable read/write file over a volume (store.live): lets pyfatfs write a filesystem
    whose every write goes through the engine's journal."""

    def __init__(self, volume: Any) -> None:
        super().__init__()
        self.volume = volume
        self.size = int(volume.size)
        self.pos = 0
        self.name = "<rewind live volume>"
        self.detached = False  # set when the workload stops: late writes (pyfatfs' __del__) are dropped

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n == 0 or self.detached:
            return 0
        data = self.volume.read(self.pos, n)
        b[:n] = data
        self.pos += n
        return n

    def write(self, b: Any) -> int:
        data = bytes(b)
        if self.detached:
            return len(data)
        if self.pos + len(data) > self.size:
            raise OSError(28, "write past the end of the demo volume")
        if data:
            self.volume.write(self.pos, data)
        self.pos += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def truncate(self, size: int | None = None) -> int:
        return self.size


def make_fat_image(path: Path, size: int, label: str = "REWINDDEMO") -> None:
    """A fresh FAT16 image at `path` (mkfs.fat when installed, else pyfatfs' own mkfs)."""
    with open(path, "wb") as f:
        f.truncate(size)
    mkfs = shutil.which("mkfs.fat") or shutil.which("mkfs.vfat")
    if mkfs:
        subprocess.run([mkfs, "-F", "16", "-n", label, str(path)], check=True, capture_output=True)
        return
    from pyfatfs.PyFat import PyFat

    pf = PyFat()
    pf.mkfs(str(path), fat_type=PyFat.FAT_TYPE_FAT16, size=size, label=label)
    pf.close()


def copy_in(volume: Any, image: Path, chunk: int = 256 * 1024) -> int:
    """Write the non-zero chunks of `image` into the volume; returns bytes written."""
    written = 0
    with open(image, "rb") as f:
        off = 0
        while True:
            data = f.read(chunk)
            if not data:
                break
            if data.count(0) != len(data):
                volume.write(off, data)
                written += len(data)
            off += len(data)
    volume.flush()
    return written


@dataclass
class DemoPaths:
    folder: Path
    primary: Path
    store_dir: Path


def remove_old_demos(root: Path, older_than_s: float = 86400.0) -> None:
    """Demos are for trying things: their folders go once they are a day old (unless in use)."""
    if not root.is_dir():
        return
    now = time.time()
    for d in root.glob("demo-*"):
        try:
            if now - d.stat().st_mtime < older_than_s:
                continue
            lock = d / STORE_NAME / "lock"
            if lock.exists():
                import fcntl

                with open(lock, "rb+") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use by another console?
                    except BlockingIOError:
                        continue
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue


def new_demo_paths(root: Path | None = None) -> DemoPaths:
    """A fresh folder for one demo (several demos can coexist)."""
    root = demo_root() if root is None else root
    remove_old_demos(root)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = root / f"demo-{stamp}"
    n = 1
    while folder.exists():
        n += 1
        folder = root / f"demo-{stamp}-{n}"
    folder.mkdir(parents=True)
    return DemoPaths(folder, folder / PRIMARY_NAME, folder / STORE_NAME)


def create_demo_store(root: Path | None = None, size: int = DEMO_SIZE) -> Any:
    """Create a protection of an empty image, then format it THROUGH the engine so the history
    starts at 'empty' and the first records are the filesystem being made. Returns the Store."""
    from rewind.engine.store import Store

    paths = new_demo_paths(root)
    store = Store.create(str(paths.primary), str(paths.store_dir), size=size)
    with tempfile.TemporaryDirectory(prefix="rewind-demo-") as tmp:
        img = Path(tmp) / "fat.img"
        make_fat_image(img, size)
        copy_in(store.live, img)
    store.mark("formatted")
    return store


# --- file contents the workload writes -----------------------------------------------------------

WORDS = ("backup history volume block journal rewind snapshot photo holiday report draft budget "
         "meeting notes invoice garden recipe travel music project idea summary chapter").split()


def text_body(rng: random.Random, lines: int) -> bytes:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    out = [f"# written {stamp}"]
    for _ in range(lines):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return ("\n".join(out) + "\n").encode()


def png_image(rng: random.Random, w: int = 96, h: int = 64) -> bytes:
    """A small gradient PNG (pure Python), so the preview has real images to show."""
    r0, g0, b0 = rng.randrange(256), rng.randrange(256), rng.randrange(256)
    rows = []
    for y in range(h):
        row = bytearray([0])
        for x in range(w):
            row += bytes(((r0 + x * 2) % 256, (g0 + y * 3) % 256, (b0 + (x + y)) % 256))
        rows.append(bytes(row))
    raw = zlib.compress(b"".join(rows), 6)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def digest(data: bytes) -> str:
    """Same digest as the preview's (xxh3 of the contents)."""
    return xxhash.xxh3_64(data).hexdigest()


@dataclass
class DemoLog:
    """What the workload had written: after each operation, (head seq, {path: digest}).
    Tests use it to check the preview at a mark against what really was there."""

    entries: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, seq: int, files: dict[str, str]) -> None:
        with self.lock:
            self.entries.append((seq, dict(files)))

    def files_at(self, seq: int) -> dict[str, str]:
        """The files as of the last completed operation at or before `seq`."""
        with self.lock:
            best: dict[str, str] = {}
            for s, files in self.entries:
                if s <= seq:
                    best = files
                else:
                    break
            return dict(best)


class DemoWorkload(threading.Thread):
    """Creates, edits and deletes files in the demo filesystem through the engine, a few
    operations a second, putting a mark every so often. `lock` is held during each operation:
    hold it to take a mark (or read) between operations."""

    def __init__(self, store: Any, log: DemoLog | None = None, seed: int | None = None,
                 interval: float = 0.15, mark_every: int = 25, max_files: int = 40,
                 on_error: Callable[[BaseException], None] | None = None,
                 busy_s: float = 120.0, max_s: float = 1800.0) -> None:
        super().__init__(name="rewind-demo-workload", daemon=True)
        self.store = store
        self.log = log if log is not None else DemoLog()
        self.rng = random.Random(seed)
        self.interval = interval
        self.mark_every = mark_every
        self.max_files = max_files
        self.on_error = on_error
        self.busy_s = busy_s  # full speed this long, then a calmer pace (the journal stays small)
        self.max_s = max_s  # then stop by itself
        self.lock = threading.RLock()
        self._halt = threading.Event()
        self.ops = 0
        self.marks_made: list[str] = []
        self.files: dict[str, str] = {}
        self.fs: Any = None
        self.file: LiveFile | None = None
        self.error: BaseException | None = None
        self.started: float | None = None  # monotonic time the workload began

    @property
    def paced(self) -> bool:
        """Past its busy start (busy_s): one operation every few seconds, so the history stays
        small. The console says so: at ~0.2 MB/s the demo otherwise looks stalled."""
        return self.started is not None and time.monotonic() - self.started >= self.busy_s

    # -- control --------------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current operation and release the filesystem (idempotent)."""
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No operation runs inside this block (marks and reads see a consistent filesystem)."""
        with self.lock:
            yield

    # -- filesystem -------------------------------------------------------------------------------
    def _mount(self) -> None:
        import warnings

        from pyfatfs.PyFatFS import PyFatBytesIOFS

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not cleanly unmounted": we never unmount the demo
            self.file = LiveFile(self.store.live)
            self.fs = PyFatBytesIOFS(self.file, preserve_case=True)
        self.files = self._scan()

    def _scan(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for path in self.fs.walk.files("/"):
            with self.fs.openbin(path, "r") as f:
                out[path] = digest(f.read())
        return out

    def _write_file(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        if parent and not self.fs.exists(parent):
            self.fs.makedirs(parent, recreate=True)
        if path in self.files:
            # pyfatfs 1.1 corrupts a file's cluster chain when truncating it in place ("w" on an
            # existing file), so an edit is written as a new file under the same name
            self.fs.remove(path)
        with self.fs.openbin(path, "w") as f:
            f.write(data)
        self.files[path] = digest(data)

    def step(self) -> str:
        """One operation (create, edit, append, delete); returns what it did."""
        rng = self.rng
        n = len(self.files)
        choice = rng.random()
        if n < 6 or (choice < 0.45 and n < self.max_files):
            folder = rng.choice(["/Documents", "/Photos", "/Projects/alpha", "/Music", ""])
            if folder == "/Photos":
                path = f"{folder}/IMG_{rng.randrange(10000):04d}.png"
                data = png_image(rng)
            elif folder == "/Music":
                path = f"{folder}/track-{rng.randrange(100):02d}.bin"
                data = rng.randbytes(rng.randint(20_000, 120_000))
            else:
                path = f"{folder}/{rng.choice(WORDS)}-{rng.randrange(1000):03d}.txt"
                data = text_body(rng, rng.randint(3, 40))
            self._write_file(path, data)
            return f"created {path}"
        if choice < 0.80:
            path = rng.choice(sorted(self.files))
            if path.endswith(".png"):
                data = png_image(rng)
            elif path.endswith(".bin"):
                data = rng.randbytes(rng.randint(20_000, 120_000))
            else:
                with self.fs.openbin(path, "r") as f:
                    data = f.read() + text_body(rng, rng.randint(1, 8))
            self._write_file(path, data)
            return f"edited {path}"
        path = rng.choice(sorted(self.files))
        self.fs.remove(path)
        del self.files[path]
        return f"deleted {path}"

    def mark(self, name: str) -> Any:
        """Mark the present point between two operations."""
        with self.lock:
            m = self.store.mark(name)
            self.marks_made.append(name)
            return m

    def _next_mark_name(self) -> str:
        """demo-N-F-files, N one past the newest demo mark in the store: a resumed (or rewound)
        demo continues the numbering instead of running into a mark it made before."""
        taken = {m.name for m in self.store.marks()}
        n = max((int(m.group(1)) for m in map(DEMO_MARK.fullmatch, taken) if m), default=0) + 1
        while (name := f"demo-{n}-{len(self.files)}-files") in taken:
            n += 1
        return name

    def run(self) -> None:
        try:
            with self.lock:
                self._mount()
                self.log.record(int(self.store.head), self.files)
            last_flush = started = time.monotonic()
            self.started = started
            while not self._halt.is_set():
                age = time.monotonic() - started
                if age > self.max_s:
                    break
                with self.lock:
                    self.step()
                    self.ops += 1
                    self.log.record(int(self.store.head), self.files)
                    if self.ops % self.mark_every == 0:
                        name = self._next_mark_name()
                        self.store.mark(name)  # the program's mark: it follows retention
                        self.marks_made.append(name)
                    if time.monotonic() - last_flush > 2.0:
                        self.store.live.flush()
                        last_flush = time.monotonic()
                pace = self.interval if age < self.busy_s else max(self.interval, 2.0)
                self._halt.wait(pace * (0.5 + self.rng.random()))
        except BaseException as e:  # noqa: BLE001 - reported to the console, never lost
            self.error = e
            if self.on_error is not None and not self._halt.is_set():
                self.on_error(e)
        finally:
            self._unmount()

    def _unmount(self) -> None:
        """Close the filesystem cleanly (FAT flushed, marked clean), then detach it from the
        volume so nothing pyfatfs does later (its __del__) can write into a rewound volume."""
        with self.lock:
            try:
                if self.fs is not None and self.error is None:
                    self.fs.close()
                    self.store.flush(primary=True)  # paused: the image on disk is whole (the applier is lazy)
            except Exception:  # noqa: BLE001 - the store may already be closed
                pass
            finally:
                if self.file is not None:
                    self.file.detached = True
