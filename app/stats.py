"""A volume's write statistics as the charts draw them, computed in the volume's worker thread.

The engine keeps one row per second with writes, for the whole history. A week of steady writes
is 600,000 rows, so the series is bucketed (1 s, 2 s, 5 s, ... 1 h) to at most MAX_BUCKETS
buckets, and the GUI thread only hands ready arrays to pyqtgraph. No Qt here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_BUCKETS = 20_000
NICE = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


@dataclass
class ChartData:
    """Step arrays for the curves plus the buckets they came from (for read-outs and density)."""

    x: np.ndarray  # seconds
    mb: np.ndarray  # MB/s
    ops: np.ndarray  # writes/s
    journal: np.ndarray  # MiB
    bucket_s: int = 1
    t: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bucket starts (s)
    writes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # writes per bucket
    nbytes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bytes per bucket
    journal_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # journal at bucket end
    total_writes: int = 0

    @property
    def empty(self) -> bool:
        return len(self.t) == 0

    def readout(self, x: float) -> tuple[int, float, float, int] | None:
        """(bucket start, MB/s, writes/s, journal bytes) at time x, or None before any write."""
        if self.empty:
            return None
        starts = self.t.tolist()
        i = bisect.bisect_right(starts, x) - 1
        if i < 0:
            return None
        start = int(starts[i])
        if x < start + self.bucket_s:
            b = self.bucket_s
            return start, float(self.nbytes[i]) / b / 1e6, float(self.writes[i]) / b, int(self.journal_bytes[i])
        return start, 0.0, 0.0, int(self.journal_bytes[i])


def nice_bucket(span_s: float, max_buckets: int = MAX_BUCKETS) -> int:
    need = span_s / max_buckets
    for b in NICE:
        if b >= need:
            return b
    return int(-(-need // 86400) * 86400)


class StatSeries:
    """Per-second rows merged as snapshots arrive (the newest second is replaced as it grows)."""

    def __init__(self) -> None:
        self.t: list[int] = []
        self.writes: list[int] = []
        self.bytes: list[int] = []
        self.journal: list[int] = []
        self.total_writes = 0

    def merge(self, rows: list[Any], reset: bool = False) -> bool:
        """Add rows; returns whether anything changed."""
        if reset:
            self.__init__()  # type: ignore[misc]
        changed = False
        for r in rows:
            t = int(r.t)
            if self.t and t <= self.t[-1]:
                i = bisect.bisect_left(self.t, t)
                if i < len(self.t) and self.t[i] == t:
                    self.total_writes += int(r.writes) - self.writes[i]
                    if (self.writes[i], self.bytes[i], self.journal[i]) != (r.writes, r.bytes, r.journal_bytes):
                        self.writes[i], self.bytes[i] = int(r.writes), int(r.bytes)
                        self.journal[i] = int(r.journal_bytes)
                        changed = True
                continue  # older than what we have and not a known second: ignore
            self.t.append(t)
            self.writes.append(int(r.writes))
            self.bytes.append(int(r.bytes))
            self.journal.append(int(r.journal_bytes))
            self.total_writes += int(r.writes)
            changed = True
        return changed or reset

    def chart(self, until: float | None = None, max_buckets: int = MAX_BUCKETS) -> ChartData:
        """Step arrays: each bucket covers [t, t+bucket); rates drop to zero over quiet gaps
        (rows exist only for seconds with writes), so a burst inside one second still shows."""
        if not self.t:
            z = np.zeros(0)
            return ChartData(z, z, z, z)
        t = np.asarray(self.t, dtype=np.int64)
        w = np.asarray(self.writes, dtype=np.float64)
        b = np.asarray(self.bytes, dtype=np.float64)
        j = np.asarray(self.journal, dtype=np.float64)
        bucket = nice_bucket(float(t[-1] - t[0] + 1), max_buckets) if len(t) > max_buckets else 1
        if bucket > 1:
            keys = (t // bucket) * bucket
            first = np.concatenate([[True], keys[1:] != keys[:-1]])
            idx = np.nonzero(first)[0]
            last = np.concatenate([idx[1:] - 1, [len(t) - 1]])
            t, w, b, j = keys[idx], np.add.reduceat(w, idx), np.add.reduceat(b, idx), j[last]
        tf = t.astype(np.float64)
        n = len(tf)
        gap = np.append(tf[1:] > tf[:-1] + bucket, True)  # a quiet stretch (or the end) after bucket i
        x = np.column_stack([tf, tf + bucket, tf + bucket]).ravel()
        keep = np.column_stack([np.ones(n, bool), np.ones(n, bool), gap]).ravel()
        mb_b, ops_b, j_m = b / bucket / 1e6, w / bucket, j / 2**20

        def rate(v: np.ndarray) -> np.ndarray:
            return np.column_stack([v, v, np.zeros(n)]).ravel()[keep]

        x = x[keep]
        mb, ops = rate(mb_b), rate(ops_b)
        jr = np.column_stack([j_m, j_m, j_m]).ravel()[keep]
        # each burst starts from zero too (and from the journal size before it)
        starts = np.concatenate([[True], gap[:-1]])
        sx = tf[starts]
        x = np.concatenate([x, sx])
        mb = np.concatenate([mb, np.zeros(len(sx))])
        ops = np.concatenate([ops, np.zeros(len(sx))])
        jr = np.concatenate([jr, np.concatenate([[0.0], j_m[:-1]])[starts]])
        order = np.lexsort((np.concatenate([np.ones(len(x) - len(sx)), np.zeros(len(sx))]), x))
        x, mb, ops, jr = x[order], mb[order], ops[order], jr[order]
        if until is not None and until > x[-1]:
            x = np.append(x, until)
            mb = np.append(mb, 0.0)
            ops = np.append(ops, 0.0)
            jr = np.append(jr, jr[-1])
        return ChartData(x, mb, ops, jr, bucket, tf, w, b, j, self.total_writes)
