"""Retention: which points in time a policy keeps (claims 6 and 7 of the seed).

A policy is tiers, youngest first: `24h:all,7d:1h,30d:1d` keeps every point for 24 hours, then the
newest point of each hour (UTC-aligned buckets) up to 7 days, then the newest of each day up to
30 days; older history fades into the horizon. Points of one bucket share an expiry, so their
maps merge into one holding, per block, the newest version in the bucket. Pinned marks are kept
whatever the tiers say. This module only decides; the Store carries the decision out.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import BadInput

DEFAULT_POLICY = "24h:all,7d:1h,30d:1d"
_DUR = re.compile(r"^(\d+)([smhdw])$")
_NS = {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9, "w": 7 * 86400 * 10**9}
HELP = "write tiers as AGE:STEP[,AGE:STEP...] with STEP 'all' or a duration, e.g. 24h:all,7d:1h,30d:1d"


def parse_duration(text: str) -> int:
    m = _DUR.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise BadInput(f"bad duration {text!r}: use a number and s, m, h, d or w (e.g. 7d)")
    return int(m.group(1)) * _NS[m.group(2)]


def format_duration(ns: int) -> str:
    for unit in ("w", "d", "h", "m", "s"):
        if ns % _NS[unit] == 0:
            return f"{ns // _NS[unit]}{unit}"
    return f"{ns / 1e9:g}s"


@dataclass(frozen=True)
class Tier:
    """Points younger than `age` keep one point per `step` (0 = every point)."""

    age: int
    step: int

    def __str__(self) -> str:
        return f"{format_duration(self.age)}:{'all' if self.step == 0 else format_duration(self.step)}"


@dataclass(frozen=True)
class Policy:
    tiers: tuple[Tier, ...]

    @classmethod
    def parse(cls, text: str) -> Policy:
        tiers = []
        for part in text.split(","):
            if ":" not in part:
                raise BadInput(f"bad tier {part!r}: {HELP}")
            age_s, step_s = part.split(":", 1)
            age = parse_duration(age_s)
            step = 0 if step_s.strip() == "all" else parse_duration(step_s)
            if step > age:
                raise BadInput(f"tier {part!r} keeps one point per {step_s} but only for {age_s}: {HELP}")
            tiers.append(Tier(age, step))
        for a, b in zip(tiers, tiers[1:], strict=False):
            if b.age <= a.age:
                raise BadInput(f"tiers must get older left to right ({a} then {b}): {HELP}")
            if b.step != 0 and a.step > b.step:
                raise BadInput(f"steps must get coarser left to right ({a} then {b}): {HELP}")
        if not tiers:
            raise BadInput(f"empty policy: {HELP}")
        return cls(tuple(tiers))

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.tiers)

    @property
    def max_age(self) -> int:
        return self.tiers[-1].age


@dataclass
class Plan:
    """What a fade does: points that stay addressable, and the new horizon (None = unchanged)."""

    keep: set[int]
    drop: set[int]
    horizon: int | None
    per_tier: list[int]


def plan(points: Iterable[tuple[int, int]], now: int, policy: Policy, pinned: Iterable[int] = ()) -> Plan:
    """Decide, for addressable (seq, time) points in seq order, which stay.

    The newest point of each (tier, bucket) stays; points older than the last tier fade, and the
    newest of them becomes the horizon, unless a pinned mark is older (history stops there).
    """
    pins = set(pinned)
    pts = list(points)
    seqs = [q for q, _ in pts]
    times = [t for _, t in pts]  # non-decreasing with seq
    keep: set[int] = set()
    per_tier = [0] * len(policy.tiers)
    hi = len(pts)
    for i, tr in enumerate(policy.tiers):
        lo = bisect.bisect_left(times, now - tr.age)  # points in [lo, hi) belong to tier i
        if tr.step == 0:
            keep.update(seqs[lo:hi])
            per_tier[i] = hi - lo
        else:
            last = None
            for k in range(hi - 1, lo - 1, -1):  # newest point of each bucket
                b = times[k] // tr.step
                if b != last:
                    keep.add(seqs[k])
                    per_tier[i] += 1
                    last = b
        hi = min(hi, lo)
    fading = seqs[:hi]
    keep |= pins & set(seqs)
    horizon = max(fading) if fading else None
    if horizon is not None:
        keep.add(horizon)  # the newest faded point becomes the horizon...
        older_pins = sorted(p for p in pins if p < horizon)
        if older_pins:
            horizon = older_pins[0]  # ...unless a pinned mark is older: history stops there
    drop = set(seqs) - keep
    return Plan(keep, drop, horizon, per_tier)


def removable_versions(seqs: list[int], retained: list[int], cutoff: int) -> list[int]:
    """Versions of one block (sorted seqs) that no retained point reads any more.

    Point S reads version v when v <= S < the next version. Every point above `cutoff` is
    retained; at or below it only those in `retained` (sorted). The newest version always stays.
    """
    out = []
    for v, nxt in zip(seqs, seqs[1:], strict=False):
        if v > cutoff:
            break
        if nxt > cutoff + 1:
            continue  # point cutoff+1 (retained) still reads v
        j = bisect.bisect_left(retained, v)
        if j < len(retained) and retained[j] < nxt:
            continue
        out.append(v)
    return out
