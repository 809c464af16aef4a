"""One face for a protection the console shows, whether the console opened it itself (Store) or a
separate `rewind serve` holds it (RemoteStore over the control socket). No Qt here.

Everything goes through the engine's public API; the console never touches a store's files.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rewind.engine.errors import BadInput, PointError, StoreLocked
from rewind.engine.jobs import Job, Progress
from rewind.engine.retention import Policy, format_duration, plan


class RemoteView:
    """A read-only view of a point of a store served elsewhere (reads over the control socket)."""

    readonly = True

    def __init__(self, remote: Any, seq: int, size: int, time_ns: int) -> None:
        self.remote = remote
        self.seq = seq
        self.size = size
        self.time_ns = time_ns

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.remote.read_at(self.seq, off, n))


class WatchedVolume:
    """The live volume as a front end sees it, reporting every failed write to `on_error`
    (then raising as before): the NBD client gets its error, and the console says so."""

    def __init__(self, volume: Any, on_error: Callable[[str, BaseException], None]) -> None:
        self._volume = volume
        self._on_error = on_error

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._volume, name)
        if name not in ("write", "write_many", "zero", "trim", "flush"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                self._on_error(name, e)
                raise
        return call


class WatchedStore:
    """A Store for an in-process front end (NbdServer) whose live writes are watched."""

    def __init__(self, store: Any, on_error: Callable[[str, BaseException], None]) -> None:
        self._store = store
        self.live = WatchedVolume(store.live, on_error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class Link:
    """The protection behind one volume view. `remote` says which kind it is."""

    def __init__(self, store: Any, remote: bool = False) -> None:
        self.store = store
        self.remote = remote
        self._info: dict[str, Any] = {}
        self._info_lock = threading.Lock()
        if remote:
            self.refresh_info()

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, store_dir: str | Path) -> Link:
        """Open a store; when a `rewind serve` holds it, attach to that process instead."""
        from rewind.engine.store import Store

        d = Path(store_dir)
        if not d.exists():
            raise BadInput(f"{d} does not exist: check the path, or protect an image to create it")
        try:
            return cls(Store.open(d))
        except StoreLocked as locked:
            try:
                from rewind.engine.control import RemoteStore
            except ImportError:
                raise StoreLocked(
                    f"{locked} (this version of Rewind cannot attach to a running serve: stop it first)"
                ) from None
            try:
                remote = RemoteStore(d)
                remote.ping()
            except Exception as e:  # noqa: BLE001 - say both what happened and what to do
                raise StoreLocked(
                    f"{d} is held by another rewind process whose control socket does not answer ({e}): "
                    "stop that process, then open the store again"
                ) from e
            return cls(remote, remote=True)

    @classmethod
    def create(cls, primary: str | Path, store_dir: str | Path, size: int | None = None) -> Link:
        from rewind.engine.store import Store

        return cls(Store.create(str(primary), str(store_dir), size=size))

    def close(self) -> None:
        self.store.close()

    # -- facts ----------------------------------------------------------------------------------
    def refresh_info(self) -> dict[str, Any]:
        info = dict(self.store.info())
        with self._info_lock:
            self._info = info
        return info

    @property
    def dir(self) -> Path:
        return Path(self.store.dir)

    @property
    def primary_path(self) -> str:
        if self.remote:
            return str(self._info.get("primary", ""))
        return str(self.store.primary_path)

    @property
    def size(self) -> int:
        return int(self._info["size"]) if self.remote else int(self.store.size)

    @property
    def block_size(self) -> int:
        return int(self._info["block_size"]) if self.remote else int(self.store.block_size)

    @property
    def head(self) -> int:
        if self.remote:
            return int(self._info["head"]["seq"])
        return int(self.store.head)

    @property
    def horizon(self) -> int:
        if self.remote:
            return int(self._info["horizon"]["seq"])
        return int(self.store.horizon)

    def point_time(self, seq: int) -> int:
        return int(self.store.point_time(seq))

    def at(self, seq: int) -> Any:
        if self.remote:
            return RemoteView(self.store, seq, self.size, self.point_time(seq))
        return self.store.at(seq)

    def seq_at_time(self, t_ns: int) -> int:
        """The newest record at or before `t_ns` (binary search over record times: log n reads)."""
        lo, hi = self.horizon, self.head
        if t_ns >= self.point_time(hi):
            return hi
        if t_ns <= self.point_time(lo):
            return lo
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.point_time(mid) <= t_ns:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def kept_point(self, seq: int, direction: int = 0, t_ns: int | None = None) -> int:
        """`seq` when it can be read; else the point retention kept next to it (a thinned stretch
        keeps e.g. one point an hour): the next one in `direction` (+1/-1, arrow keys), else the
        one nearer in time to `t_ns` (a click). The engine names both neighbours in its refusal,
        for a local store and a served one alike."""
        try:
            return int(self.store.resolve(seq))
        except PointError as e:
            msg = str(e)
            near = [int(x) for x in re.findall(r"seq:(\d+)", msg.partition("nearest kept points are")[2])]
            if "merged away" not in msg or not near:
                raise
        before = [s for s in near if s < seq]
        after = [s for s in near if s > seq]
        if direction > 0 and after:
            return after[0]
        if direction < 0 and before:
            return before[-1]
        if t_ns is None or len(near) == 1:
            return min(near, key=lambda s: abs(s - seq))
        return min(near, key=lambda s: abs(self.point_time(s) - t_ns))

    # -- pass-through ---------------------------------------------------------------------------
    def marks(self) -> list[Any]:
        return list(self.store.marks())

    def mark(self, name: str, pinned: bool = True, at: int | None = None) -> Any:
        """A mark; the console's are a person's (kept until removed) unless `pinned` is False."""
        if at is None:
            return self.store.mark(name, pinned=pinned)
        return self.store.mark(name, pinned=pinned, at=at)

    def unmark(self, name: str) -> Any:
        return self.store.unmark(name)

    def pin(self, name: str, pinned: bool = True) -> Any:
        return self.store.pin(name, pinned)

    def fade_preview(self, policy: str | None = None) -> dict[str, Any]:
        """What a fade would remove now (under `policy`, or the store's own); changes nothing."""
        return dict(self.store.fade_preview(policy))

    def stats(self, since_ns: int | None = None) -> list[Any]:
        return list(self.store.stats(since_ns=since_ns))

    def info(self) -> dict[str, Any]:
        return self.refresh_info() if self.remote else dict(self.store.info())

    def retention(self) -> dict[str, Any]:
        """Retention settings (max_size, on_full); empty when the engine has none."""
        fn = getattr(self.store, "retention", None)
        if fn is None:
            return {}
        try:
            r = fn()
        except Exception:  # noqa: BLE001 - an older serve may not know the call
            return {}
        return dict(r) if isinstance(r, dict) else {}

    def changed_blocks(self, a: int, b: int) -> list[int]:
        return list(self.store.changed_blocks(a, b))

    def export(self, seq: int, out: str) -> Any:
        return self.store.export(seq, out)

    def verify(self) -> Any:
        return self.store.verify()

    def rewind(self, seq: int) -> Any:
        if not self.remote:
            return self.store.rewind(seq)
        remote = self.store

        def body(check: Callable[[], None]) -> Generator[Progress, None, Any]:
            check()
            yield Progress("rewind", 0, 1)
            result = remote.rewind(seq)  # runs inside serve, which journals it
            yield Progress("rewind", 1, 1)
            if isinstance(result, dict):
                return result.get("mark", result.get("name"))
            return result

        return Job("rewind", body)

    def set_retention(self, policy: str | None = None, max_size: int | None = None,
                      on_full: str | None = None) -> dict[str, Any]:
        """Change retention (checked by the engine before anything is saved); max_size 0 = no limit."""
        return dict(self.store.set_retention(policy=policy, max_size=max_size, on_full=on_full))

    def fade(self) -> Any:
        """Job: apply retention now (inside serve when attached)."""
        return self.store.fade()

    def add_listener(self, fn: Callable[[str, dict[str, Any]], None]) -> None:
        """Engine events; an attached console gets them streamed from serve's control socket."""
        add = getattr(self.store, "add_listener", None)
        if add is not None:
            add(fn)

    def remove_listener(self, fn: Callable[[str, dict[str, Any]], None]) -> None:
        remove = getattr(self.store, "remove_listener", None)
        if remove is not None:
            remove(fn)


# -- what a policy will keep ----------------------------------------------------------------------

_STEP_WORDS = {60: "every minute", 3600: "hourly", 86400: "daily", 7 * 86400: "weekly"}


def step_words(step_ns: int) -> str:
    """0 -> 'every write', 1h -> 'hourly', 10m -> 'one per 10m'."""
    if step_ns == 0:
        return "every write"
    s = step_ns // 10**9
    return _STEP_WORDS.get(s, f"one per {format_duration(step_ns)}") if step_ns % 10**9 == 0 else \
        f"one per {format_duration(step_ns)}"


@dataclass
class Band:
    """A stretch of the timeline and how finely the policy keeps it."""

    lo_ns: int
    hi_ns: int
    step_ns: int  # 0 = every write
    label: str
    points: int = 0


@dataclass
class RetentionPreview:
    """What a policy keeps of the present history (one-second resolution, from its statistics)."""

    policy: str
    now_ns: int
    bands: list[Band]
    horizon_ns: int  # the horizon now
    new_horizon_ns: int | None  # where the next fade moves it (None: it stays)
    fading: int  # writes older than the last tier: they fade into the horizon
    points_now: int  # points (writes and marks) in the history now
    kept: int = 0
    pinned: list[str] = field(default_factory=list)
    # what the engine's own fade would remove under this policy (store.fade_preview): the marks
    # Rewind made that go with their points (a person's never do), and how many points go
    marks_fading: list[str] = field(default_factory=list)
    points_removed: int | None = None


def bands_for(policy: Policy, now_ns: int) -> list[Band]:
    """The policy's tiers as stretches of time ending now (youngest first)."""
    out: list[Band] = []
    hi = now_ns
    for tier in policy.tiers:
        lo = now_ns - tier.age
        out.append(Band(lo, hi, tier.step, step_words(tier.step)))
        hi = lo
    return out


def preview_retention(policy_text: str, seconds: Sequence[int], writes: Sequence[int], marks: Sequence[Any],
                      horizon_ns: int, now_ns: int) -> RetentionPreview:
    """Run retention.plan over the history's points as the console knows them: one point per
    second with writes (rows of store.stats(), the newest write of that second) plus every mark.
    Tiers that keep every write count the writes themselves. BadInput for a bad policy.

    Only the newest point of each gcd(steps) stretch can be the one a step tier keeps, so plan()
    sees one point per such stretch (a week of busy seconds at hourly steps: 168 points)."""
    policy = Policy.parse(policy_text)
    t = np.asarray(seconds, dtype=np.int64)
    w = np.asarray(writes, dtype=np.int64)
    keep = (w > 0) & (t >= horizon_ns // 10**9)
    t_ns = np.maximum(t[keep] * 10**9, horizon_ns)
    w = w[keep]
    ms = sorted((int(m.time_ns), bool(getattr(m, "pinned", False)), str(m.name)) for m in marks
                if int(m.time_ns) >= horizon_ns)
    m_ns = [m[0] for m in ms]
    steps = [tier.step for tier in policy.tiers if tier.step]
    g = math.gcd(*steps) if steps else 10**9
    if len(t_ns):
        keys = t_ns // g
        zone = np.searchsorted(sorted(now_ns - tier.age for tier in policy.tiers), t_ns, "right")
        last = (keys[1:] != keys[:-1]) | (zone[1:] != zone[:-1])  # never across a tier's edge
        t_plan = t_ns[np.append(last, True)].tolist()
    else:
        t_plan = []
    pts = sorted([(x, False) for x in t_plan] + [(m[0], m[1]) for m in ms])
    times = [x for x, _ in pts]
    pl = plan(list(enumerate(times)), now_ns, policy, [i for i, p in enumerate(pts) if p[1]])
    acc = np.concatenate([[0], np.cumsum(w)])

    def count(lo_ns: float, hi_ns: float) -> int:
        """Writes and marks with lo_ns <= time < hi_ns."""
        a, b = np.searchsorted(t_ns, [lo_ns, hi_ns], "left") if len(t_ns) else (0, 0)
        return int(acc[b] - acc[a]) + bisect.bisect_left(m_ns, hi_ns) - bisect.bisect_left(m_ns, lo_ns)

    bands = bands_for(policy, now_ns)
    for i, (band, tier) in enumerate(zip(bands, policy.tiers, strict=True)):
        if tier.step == 0:
            band.points = count(band.lo_ns, float("inf") if i == 0 else band.hi_ns)
        else:
            band.points = pl.per_tier[i]
    fading = count(float("-inf"), bands[-1].lo_ns)
    new_h = times[pl.horizon] if pl.horizon is not None else None
    return RetentionPreview(
        policy=str(policy), now_ns=now_ns, bands=bands, horizon_ns=horizon_ns,
        new_horizon_ns=new_h if new_h is not None and new_h > horizon_ns else None,
        fading=fading, points_now=int(acc[-1]) + len(ms), kept=sum(b.points for b in bands),
        pinned=[m[2] for m in ms if m[1]],
    )
