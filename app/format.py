"""Numbers and times as people read them (status bar, labels, dialogs)."""

from __future__ import annotations

import datetime as _dt


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def human_time(t_ns: int, with_date: bool | None = None) -> str:
    """Local time; the date only when it is not today (or when asked)."""
    dt = _dt.datetime.fromtimestamp(t_ns / 1e9)
    today = _dt.date.today()
    if with_date or (with_date is None and dt.date() != today):
        return dt.strftime("%Y-%m-%d %H:%M:%S")
    return dt.strftime("%H:%M:%S.%f")[:-3]


def human_duration(seconds: float) -> str:
    """75 -> '1 min 15 s'."""
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return "under a second"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def human_ago(t_ns: int, now_ns: int) -> str:
    """How long before `now_ns`: '3 min ago'."""
    d = (now_ns - t_ns) / 1e9
    if d < 1:
        return "now"
    return human_duration(d) + " ago"
