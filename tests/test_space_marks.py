"""A space limit with fade never takes a person's mark: history stops at it, and writes go on."""

from __future__ import annotations

from pathlib import Path

from rewind.engine.store import Store


def test_early_fade_keeps_a_persons_mark(tmp_path: Path) -> None:
    s = Store.create(tmp_path / "disk.img", tmp_path / "store", size=8 << 20, block_size=4096)
    events: list[tuple[str, dict]] = []
    try:
        s.set_retention(max_size=4 << 20, on_full="fade")
        s.add_listener(lambda k, d: events.append((k, d)))
        s.live.write(0, b"\x11" * 65536)
        s.flush()
        s.mark("mine", pinned=True)  # a person's mark: kept until removed
        s.mark("before-rewind-9", pinned=False)
        s.start_retention(interval_s=3600)
        for i in range(400):  # ~25 MiB through a 4 MiB limit
            s.live.write((i % 100) * 65536, bytes([i % 251]) * 65536)
        s.flush()
        names = {m.name for m in s.marks()}
        assert "mine" in names
        assert s.at("mark:mine").read(0, 65536) == b"\x11" * 65536
        assert any(k == "space-held" and d["mark"] == "mine" for k, d in events)
    finally:
        s.close()
