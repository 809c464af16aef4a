"""Watch mode: another program (dd conv=notrunc) changes the primary in place; we journal it."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from rewind.engine.frontends.watch import SHADOW, Watcher, clone_file, watch_info, watch_protect
from rewind.engine.store import Store

SIZE = 16 << 20


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_primary(path: Path) -> None:
    """Sparse, with data in a few places (so holes and data both get scanned)."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off in (0, 5 << 20, 11 << 20):
            f.seek(off)
            f.write(os.urandom(1 << 20))


def test_clone_file_keeps_contents_and_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.img", tmp_path / "b.img"
    make_primary(src)
    how = clone_file(src, dst)
    assert how in ("reflink", "copy_file_range", "sparse copy")
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks <= os.stat(src).st_blocks + 64


def test_scan_journals_in_place_changes(tmp_path: Path) -> None:
    prim = tmp_path / "disk.img"
    make_primary(prim)
    before = prim.read_bytes()
    store = watch_protect(prim, tmp_path / "store")
    try:
        assert (store.dir / SHADOW).exists()
        w = Watcher(store)
        w.prepare()
        assert w.scan(quick=True).changed_blocks == 0
        seq0 = store.head
        with open(prim, "r+b") as f:  # partial blocks, a hole filled, data zeroed
            f.seek(100)
            f.write(b"x" * 10)
            f.seek(9 << 20)
            f.write(os.urandom(20000))
            f.seek(5 << 20)
            f.write(bytes(8192))
        r = w.scan()
        assert r.changed_blocks == 1 + 5 + 2
        after = prim.read_bytes()
        store.export(seq0, tmp_path / "p0.img").run()
        store.export(r.seq, tmp_path / "p1.img").run()
        assert (tmp_path / "p0.img").read_bytes() == before
        assert (tmp_path / "p1.img").read_bytes() == after
        assert (store.dir / SHADOW).read_bytes() == after
        assert w.scan().changed_blocks == 0
        assert store.info()["mode"] == "watch"
    finally:
        store.close()


def test_watch_dd_bursts_every_point_exported(tmp_path: Path) -> None:
    if shutil.which("dd") is None:
        pytest.skip("dd is not installed")
    prim = tmp_path / "disk.img"
    make_primary(prim)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4 << 20))
    rng = random.Random(7)
    store = watch_protect(prim, tmp_path / "store")
    copies: list[tuple[int, Path]] = []
    try:
        w = Watcher(store, debounce=0.1).start()
        assert watch_info(store.dir)["watching"] is True  # type: ignore[index]
        copies.append((store.head, tmp_path / "copy0.img"))
        shutil.copyfile(prim, copies[-1][1])
        for burst in range(1, 7):
            before = w.scans
            for _ in range(rng.randint(1, 4)):
                bs = rng.choice([512, 1000, 4096, 65536])
                count = rng.randint(1, 16)
                seek = rng.randrange(0, SIZE // bs - count)
                subprocess.run(["dd", f"if={src}", f"of={prim}", f"bs={bs}", f"count={count}",
                                f"skip={rng.randrange(0, 32)}", f"seek={seek}", "conv=notrunc", "status=none"],
                               check=True)
            if burst == 4:  # punch a hole: the hole path of the scan
                subprocess.run(["fallocate", "-p", "-o", str(5 << 20), "-l", str(64 << 10), str(prim)],
                               check=False)
            deadline = time.monotonic() + 15
            while w.scans == before and time.monotonic() < deadline:  # the events made a scan
                time.sleep(0.02)
            assert w.scans > before, "no scan after the burst: change events were not seen"
            assert w.wait_idle(timeout=15, settle=0.5), "watcher did not settle"
            copy = tmp_path / f"copy{burst}.img"
            shutil.copyfile(prim, copy)
            copies.append((store.head, copy))
            assert w.scan().changed_blocks == 0, "the event-driven scans missed a change"
        w.stop()
        info = watch_info(store.dir)
        assert info is not None and info["watching"] is False and info["scans"] >= 6
        seqs = [s for s, _ in copies]
        assert seqs == sorted(set(seqs)), f"each burst should make a new point: {seqs}"
        for seq, copy in copies:
            out = tmp_path / f"export{seq}.img"
            store.export(seq, out).run()
            assert sha(out) == sha(copy), f"point seq:{seq} differs from the copy taken then"
        print(f"\n{len(copies)} points (seq {seqs}) exported and equal to the copies; {w.scans} scans")
    finally:
        store.close()


def test_changes_while_not_watching_are_caught_on_start(tmp_path: Path) -> None:
    prim = tmp_path / "disk.img"
    make_primary(prim)
    before = prim.read_bytes()
    store = watch_protect(prim, tmp_path / "store")
    store.close()
    with open(prim, "r+b") as f:  # nobody watching
        f.seek(3 << 20)
        f.write(os.urandom(40000))
    store = Store.open(tmp_path / "store")
    try:
        seq0 = store.head
        w = Watcher(store).start()
        w.stop()
        assert store.head > seq0
        store.export(seq0, tmp_path / "old.img").run()
        assert (tmp_path / "old.img").read_bytes() == before
        assert store.at("now").read(0, SIZE) == prim.read_bytes()
    finally:
        store.close()


def test_lost_digests_are_rebuilt_from_the_shadow(tmp_path: Path) -> None:
    prim = tmp_path / "disk.img"
    make_primary(prim)
    store = watch_protect(prim, tmp_path / "store")
    try:
        (store.dir / "watch-digests.bin").unlink()
        w = Watcher(store)
        assert w.prepare() == "redigested"
        with open(prim, "r+b") as f:
            f.seek(0)
            f.write(b"!" * 4096)
        assert w.scan().changed_blocks == 1
    finally:
        store.close()


def test_rewind_of_a_watched_file(tmp_path: Path) -> None:
    """A rewind writes the primary itself: the watcher sees it and history stays right."""
    prim = tmp_path / "disk.img"
    make_primary(prim)
    store = watch_protect(prim, tmp_path / "store")
    try:
        w = Watcher(store, debounce=0.05).start()
        store.mark("start")
        start = prim.read_bytes()
        with open(prim, "r+b") as f:
            f.seek(5 << 20)
            f.write(os.urandom(64 << 10))
        assert w.wait_idle(timeout=15)
        changed = prim.read_bytes()
        seq_changed = store.head
        store.rewind("mark:start").run()
        assert prim.read_bytes() == start
        assert w.wait_idle(timeout=15)
        w.stop()
        assert store.at("now").read(0, SIZE) == start
        assert store.at(seq_changed).read(0, SIZE) == changed
        assert store.at("mark:start").read(0, SIZE) == start
    finally:
        store.close()
