"""A writer faster than the indexer waits for it: rows held in memory stay bounded, and every
point still reads exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from rewind.engine import store as store_mod
from rewind.engine.store import Store

BS = 4096


def test_writers_wait_for_a_slow_indexer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "INDEX_MAX_PENDING", 2_000)
    size = 512 * BS
    s = Store.create(tmp_path / "disk.img", tmp_path / "store", size=size)
    rnd = random.Random(3)
    model = bytearray(size)
    snaps: dict[int, bytes] = {}
    most = 0
    for _ in range(300):
        reqs = []
        for _ in range(32):
            off = rnd.randrange(size // BS) * BS
            data = rnd.randbytes(BS)
            reqs.append(("write", off, data))
            model[off : off + BS] = data
        s.live.write_many(reqs)
        snaps[s.head] = bytes(model)
        most = max(most, len(s._gen.versions) + sum(len(g.versions) for g in s._frozen))
    assert most <= 2_000 + 64, f"{most} rows pending: the writer did not wait for the indexer"
    for seq in rnd.sample(sorted(snaps), 20):
        assert s.at(seq).read(0, size) == snaps[seq], f"seq {seq}"
    s.close()
