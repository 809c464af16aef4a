"""What the preview pane shows for one point in time, computed off the GUI thread.

pytsk3 reads the filesystem (ext2/3/4, FAT, NTFS, HFS+, ...) through a cached file-like view of
`store.at(seq)`; the file tree at the point is compared with the tree now to mark files added,
changed and deleted since. Where no filesystem is recognised the preview is a map of the blocks
that changed since the point. No Qt here: workers call this and pass the result to the views.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytsk3
import xxhash

CHUNK = 16 * 1024  # small files are the common case: bigger chunks read (and look up) blocks no one asked for
CACHE_CHUNKS = 4096  # 64 MiB at most per view
DIGEST_LIMIT = 4 * 1024 * 1024  # files up to this size are compared by content
MAX_ENTRIES = 20000  # a preview lists at most this many entries (huge filesystems stay responsive)
DIGEST_BUDGET = 32 * 1024 * 1024  # content read per tree for digests; past it, size+mtime decide


class ReadableView(Protocol):
    """What the engine's View and Volume have in common (read-only use)."""

    size: int

    def read(self, off: int, n: int) -> bytes: ...


class CachedReader:
    """Reads of a view in aligned 16 KiB chunks with an LRU cache: pytsk3 makes hundreds of small
    reads to list a directory, and each engine read costs a map lookup."""

    def __init__(self, view: ReadableView, chunk: int = CHUNK, max_chunks: int = CACHE_CHUNKS) -> None:
        self.view = view
        self.size = int(view.size)
        self.chunk = chunk
        self.max_chunks = max_chunks
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self.engine_reads = 0

    def _chunk(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is not None:
            self._cache.move_to_end(i)
            return data
        off = i * self.chunk
        n = min(self.chunk, self.size - off)
        data = self.view.read(off, n) if n > 0 else b""
        self.engine_reads += 1
        self._cache[i] = data
        if len(self._cache) > self.max_chunks:
            self._cache.popitem(last=False)
        return data

    def read(self, off: int, n: int) -> bytes:
        if off >= self.size or n <= 0:
            return b""
        n = min(n, self.size - off)
        first, last = off // self.chunk, (off + n - 1) // self.chunk
        if first == last:
            base = first * self.chunk
            return self._chunk(first)[off - base:off - base + n]
        parts = [self._chunk(i) for i in range(first, last + 1)]
        joined = b"".join(parts)
        start = off - first * self.chunk
        return joined[start:start + n]


class PointImage(pytsk3.Img_Info):  # type: ignore[misc]
    """A pytsk3 image whose bytes come from a CachedReader (an engine view at one point)."""

    def __init__(self, reader: CachedReader) -> None:
        self.reader = reader
        super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

    def close(self) -> None:
        pass

    def read(self, offset: int, size: int) -> bytes:
        return self.reader.read(offset, size)

    def get_size(self) -> int:
        return self.reader.size


@dataclass
class FileEntry:
    """One file or directory of a filesystem at a point; `status` is set by compare()."""

    path: str
    is_dir: bool
    size: int
    mtime: int
    inode: int
    digest: str = ""
    status: str = ""  # "", "added", "changed", "deleted" (relative to now)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass
class FsTree:
    """A filesystem found in a view: its type, where it starts and its entries by path."""

    fs_type: str
    offset: int
    entries: dict[str, FileEntry]
    truncated: bool = False


@dataclass
class Preview:
    """Everything the preview pane needs for one point (built in a worker thread)."""

    seq: int
    time_ns: int
    head: int
    fs_type: str | None
    entries: list[FileEntry] = field(default_factory=list)  # sorted by path; includes "added" ones
    changed_blocks: list[int] = field(default_factory=list)  # when no filesystem was found
    block_size: int = 4096
    volume_size: int = 0
    first_bytes: bytes = b""  # hex view when no filesystem was found
    elapsed_ms: float = 0.0
    truncated: bool = False
    error: str = ""
    now_fs: bool = True  # False: no filesystem is recognised now (wiped or replaced since the point)

    def counts(self) -> dict[str, int]:
        out = {"added": 0, "changed": 0, "deleted": 0}
        for e in self.entries:
            if e.status in out and not e.is_dir:
                out[e.status] += 1
        return out

    def files(self) -> dict[str, str]:
        """Files present at the point (not the ones added since): path -> content digest."""
        return {e.path: e.digest for e in self.entries if not e.is_dir and e.status != "added"}


FS_NAMES = {
    "TSK_FS_TYPE_FAT12": "FAT12", "TSK_FS_TYPE_FAT16": "FAT16", "TSK_FS_TYPE_FAT32": "FAT32",
    "TSK_FS_TYPE_EXFAT": "exFAT", "TSK_FS_TYPE_EXT2": "ext2", "TSK_FS_TYPE_EXT3": "ext3",
    "TSK_FS_TYPE_EXT4": "ext4", "TSK_FS_TYPE_NTFS": "NTFS", "TSK_FS_TYPE_HFS": "HFS+",
    "TSK_FS_TYPE_ISO9660": "ISO 9660", "TSK_FS_TYPE_FFS1": "UFS1", "TSK_FS_TYPE_FFS2": "UFS2",
}


def _fs_name(fs: Any) -> str:
    t = fs.info.ftype
    for attr, label in FS_NAMES.items():
        if getattr(pytsk3, attr, None) == t:
            return label
    return "filesystem"


def sniff_fs(read: Any, offset: int = 0) -> int | None:
    """The TSK filesystem type at `offset` from its magic bytes, or None. Asking TSK to detect
    by itself tries every type, and its YAFFS2 probe reads the whole volume: 26 MB of reads for a
    64 MiB FAT image, where the magic bytes need 4 KiB."""
    head = read(offset, 4096)
    if len(head) < 2048:
        return None
    if head[3:11] == b"NTFS    ":
        return int(pytsk3.TSK_FS_TYPE_NTFS)
    if head[3:11] == b"EXFAT   ":
        return int(pytsk3.TSK_FS_TYPE_EXFAT)
    if head[1080:1082] == b"\x53\xef":
        return int(pytsk3.TSK_FS_TYPE_EXT_DETECT)
    if head[1024:1026] in (b"H+", b"HX"):
        return int(pytsk3.TSK_FS_TYPE_HFS_DETECT)
    if head[510:512] == b"\x55\xaa" and (head[54:59] in (b"FAT12", b"FAT16", b"FAT  ")
                                           or head[82:87] == b"FAT32"):
        return int(pytsk3.TSK_FS_TYPE_FAT_DETECT)
    iso = read(offset + 32769, 5)
    if iso == b"CD001":
        return int(pytsk3.TSK_FS_TYPE_ISO9660)
    return None


def open_fs(img: PointImage) -> tuple[Any, int] | None:
    """The filesystem at the start of the image, else in the first partition that has one."""
    read = img.reader.read
    kind = sniff_fs(read, 0)
    if kind is not None:
        try:
            return pytsk3.FS_Info(img, offset=0, type=kind), 0
        except OSError:
            pass
    if read(510, 2) != b"\x55\xaa":
        return None  # no MBR (a GPT disk has a protective MBR): no partitions to look into
    try:
        volume = pytsk3.Volume_Info(img)
    except OSError:
        return None
    block = volume.info.block_size
    for part in volume:
        if part.flags != pytsk3.TSK_VS_PART_FLAG_ALLOC or part.len < 16:
            continue
        offset = part.start * block
        kind = sniff_fs(read, offset)
        if kind is None:
            continue
        try:
            return pytsk3.FS_Info(img, offset=offset, type=kind), offset
        except OSError:
            continue
    return None


_SKIP_ROOT = {"$MBR", "$FAT1", "$FAT2", "$OrphanFiles", "$Extend", "lost+found"}


def _digest(f: Any, size: int) -> str:
    """Content digest (xxh3) of a small file; for big ones, head+tail+size (cheap, good enough
    to say 'changed' in a preview; exports are byte-exact anyway). `f` is the pytsk3 File met
    while walking: opening by path again would walk the directories once more per file."""
    try:
        h = xxhash.xxh3_64()
        if size <= DIGEST_LIMIT:
            off = 0
            while off < size:
                n = min(1 << 20, size - off)
                h.update(f.read_random(off, n))
                off += n
        else:
            h.update(f.read_random(0, 65536))
            h.update(f.read_random(size - 65536, 65536))
            h.update(str(size).encode())
        return h.hexdigest()
    except OSError:
        return "?"


def walk(fs: Any, digests: bool = True, limit: int = MAX_ENTRIES,
         budget: int = DIGEST_BUDGET) -> tuple[dict[str, FileEntry], bool]:
    """Every allocated file and directory below '/', with content digests for as many files as
    `budget` bytes of reading allow (a big filesystem must not make each slider move read it all;
    files past the budget are compared by size and modification time)."""
    out: dict[str, FileEntry] = {}
    seen_dirs: set[int] = set()

    def visit(directory: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for entry in directory:
            name_info = entry.info.name
            if name_info.flags & pytsk3.TSK_FS_NAME_FLAG_UNALLOC:
                continue
            name = name_info.name.decode("utf-8", "replace")
            if name in (".", "..") or name.endswith("(Volume Label Entry)"):
                continue
            if not prefix and name in _SKIP_ROOT:
                continue
            yield prefix + "/" + name, entry

    stack: list[tuple[Any, str]] = [(fs.open_dir("/"), "")]
    truncated = False
    while stack:
        directory, prefix = stack.pop()
        for path, entry in visit(directory, prefix):
            meta = entry.info.meta
            if meta is None:
                continue
            is_dir = meta.type == pytsk3.TSK_FS_META_TYPE_DIR
            size = int(meta.size) if not is_dir else 0
            fe = FileEntry(path, is_dir, size, int(meta.mtime or 0), int(meta.addr))
            if not is_dir and meta.type == pytsk3.TSK_FS_META_TYPE_REG and digests and budget > 0:
                fe.digest = _digest(entry, size)
                budget -= size if size <= DIGEST_LIMIT else 2 * 65536
            out[path] = fe
            if len(out) >= limit:
                return out, True
            if is_dir and meta.addr not in seen_dirs:
                seen_dirs.add(meta.addr)
                try:
                    stack.append((entry.as_directory(), path))
                except OSError:
                    continue
    return out, truncated


def read_tree(view: ReadableView, chunk: int = CHUNK) -> FsTree | None:
    """The filesystem tree of a view, or None when no filesystem is recognised."""
    img = PointImage(CachedReader(view, chunk))
    found = open_fs(img)
    if found is None:
        return None
    fs, offset = found
    entries, truncated = walk(fs)
    return FsTree(_fs_name(fs), offset, entries, truncated)


def compare(at: FsTree, now: FsTree | None) -> list[FileEntry]:
    """The point's entries marked against now, plus the files added since (status 'added')."""
    if now is None:
        return sorted(at.entries.values(), key=lambda e: e.path)
    out: list[FileEntry] = []
    for path, e in at.entries.items():
        cur = now.entries.get(path)
        if cur is None:
            e.status = "deleted"
        elif not e.is_dir and (e.size != cur.size or (e.digest != cur.digest if e.digest and cur.digest
                                                       else e.mtime != cur.mtime)):
            e.status = "changed"
        out.append(e)
    for path, cur in now.entries.items():
        if path not in at.entries:
            added = FileEntry(cur.path, cur.is_dir, cur.size, cur.mtime, cur.inode, cur.digest, "added")
            out.append(added)
    # a directory holding changes is marked changed too, so the tree shows where to look
    marked = {e.path for e in out if e.status}
    dirs = {e.path: e for e in out if e.is_dir}
    for p in marked:
        parent = p.rsplit("/", 1)[0]
        while parent:
            d = dirs.get(parent)
            if d is not None and not d.status:
                d.status = "changed"
            parent = parent.rsplit("/", 1)[0]
    out.sort(key=lambda e: e.path)
    return out


class PreviewBuilder:
    """Builds Previews for one store; keeps the tree 'now' (by head seq) so a slider move costs one
    tree walk at the point, not two."""

    def __init__(self, store: Any) -> None:
        self.store = store
        # over a control socket every read is a round trip: fewer, bigger ones
        self.chunk = 256 * 1024 if getattr(store, "remote", False) else CHUNK
        self._now_seq = -1
        self._now_tree: FsTree | None = None
        self._fs_seen: bool | None = None

    def now_tree(self, head: int) -> FsTree | None:
        if head != self._now_seq:
            self._now_tree = read_tree(self.store.at(head), self.chunk)
            self._now_seq = head
        return self._now_tree

    def build(self, seq: int, head: int | None = None) -> Preview:
        t0 = time.perf_counter()
        store = self.store
        head = store.head if head is None else head
        view = store.at(seq)
        p = Preview(seq=seq, time_ns=int(view.time_ns), head=head, fs_type=None,
                    block_size=int(store.block_size), volume_size=int(store.size))
        tree = read_tree(view, self.chunk)
        if tree is not None:
            p.fs_type = tree.fs_type
            p.truncated = tree.truncated
            now = self.now_tree(head) if seq != head else None
            p.entries = compare(tree, now)
            if seq == head:
                p.entries = sorted(tree.entries.values(), key=lambda e: e.path)
            elif now is None:
                # the filesystem is gone now (wiped, reformatted as something unknown): every
                # file of the point is deleted since, not "unchanged"
                p.now_fs = False
                for e in p.entries:
                    e.status = "deleted"
        else:
            p.changed_blocks = list(store.changed_blocks(seq, head)) if seq != head else []
            first = p.changed_blocks[0] * p.block_size if p.changed_blocks else 0
            p.first_bytes = view.read(first, min(4096, p.volume_size - first)) if p.volume_size else b""
        p.elapsed_ms = (time.perf_counter() - t0) * 1000
        return p

    def read_file(self, seq: int, path: str, limit: int | None = None) -> bytes:
        """The contents of `path` as it was at `seq` (whole file unless `limit`)."""
        img = PointImage(CachedReader(self.store.at(seq), self.chunk))
        found = open_fs(img)
        if found is None:
            raise FileNotFoundError(path)
        fs, _ = found
        f = fs.open(path)
        size = int(f.info.meta.size)
        n = size if limit is None else min(size, limit)
        chunks = []
        off = 0
        while off < n:
            k = min(1 << 20, n - off)
            chunks.append(f.read_random(off, k))
            off += k
        return b"".join(chunks)
