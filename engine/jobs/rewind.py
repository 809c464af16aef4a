"""rewind: make the primary equal to a past point in place, undoably (claim 4: selective playback).

Only the blocks that differ between the point and now are played back from the journal, and they
go through the normal write path, so the rewind is itself history: the "before-rewind-N" mark
taken first is the way back.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from . import Job, Progress

if TYPE_CHECKING:
    from ..store import Store

RUN_BLOCKS = 256


def rewind_job(store: Store, seq: int) -> Job:
    def body(check: Callable[[], None]) -> Generator[Progress, None, Any]:
        n = 1
        while store._find_mark(f"before-rewind-{n}") is not None:
            n += 1
        name = f"before-rewind-{n}"
        here = store.mark(name).seq
        store._emit("rewind-start", {"mark": name, "to_seq": seq})
        blocks = store.changed_blocks(seq, here)
        bs = store.block_size
        runs: list[tuple[int, int]] = []
        for b in blocks:
            if runs and runs[-1][1] == b and runs[-1][1] - runs[-1][0] < RUN_BLOCKS:
                runs[-1] = (runs[-1][0], b + 1)
            else:
                runs.append((b, b + 1))
        done = 0
        for s, e in runs:
            check()
            data = store._read(seq, s * bs, (e - s) * bs)
            if data.count(0) == len(data):
                store._write_many([("zero", s * bs, len(data))], False)
            else:
                store._write_many([("write", s * bs, data)], False)
            done += e - s
            yield Progress("rewind", done, len(blocks))
        store.flush(primary=True)
        store._emit("rewind", {"mark": name, "to_seq": seq, "blocks": len(blocks)})
        return name

    return Job("rewind", body)
