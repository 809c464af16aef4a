"""POINT parsing: now, ISO-8601 times, relative times, mark:NAME, seq:N.

Parsing is pure (no store); the Store resolves a parsed point to a record sequence number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction

from .errors import PointError

_REL = re.compile(r"^-(\d+(?:\.\d+)?)([smhdw])$", re.ASCII)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
MAX_BACK_NS = 10_000 * 366 * 86400 * 10**9  # a relative time further back than any calendar date
_UNIT_NS = {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9, "w": 7 * 86400 * 10**9}
MARK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+@:,=-]{0,99}$")

HELP = "use now, an ISO time (2026-11-27T10:15:00), -30s/-5m/-2h/-1d, mark:NAME or seq:N"


@dataclass(frozen=True)
class Point:
    """A parsed POINT: kind is "now", "time" (value = ns since epoch), "seq" or "mark"."""

    kind: str
    value: int = 0
    name: str = ""


def parse_point(text: str | int, now_ns: int) -> Point:
    """Parse POINT text; relative times are taken back from `now_ns`."""
    if isinstance(text, int):
        return Point("seq", text)
    s = text.strip()
    if not s:
        raise PointError(f"empty point in time: {HELP}")
    try:
        s.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 (from argv or a file name): no mark or time has them
        raise PointError(f"point {_show(s)} is not valid UTF-8 text: {HELP}") from None
    if s == "now":
        return Point("now")
    if s.startswith("mark:"):
        name = s[5:]
        if not name:
            raise PointError(f"empty mark name in {s!r}: {HELP}")
        return Point("mark", name=name)
    if s.startswith("seq:"):
        try:
            n = int(s[4:])
        except ValueError:
            raise PointError(f"bad record number in {_show(s)}: {HELP}") from None
        if n < 0:
            raise PointError(f"record numbers are not negative: {s!r}")
        return Point("seq", n)
    m = _REL.match(s)
    if m:
        # Exact arithmetic: a float turns -<400 nines>d into infinity and loses nanoseconds.
        num = m.group(1)
        back = int(Fraction(num) * _UNIT_NS[m.group(2)]) if len(num) <= 40 else MAX_BACK_NS + 1
        if back > MAX_BACK_NS:
            raise PointError(f"{_show(s)} is further back than any history: {HELP}")
        return Point("time", now_ns - back)
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise PointError(f"cannot read point in time {_show(s)}: {HELP}") from None
    try:
        if dt.tzinfo is None:
            dt = dt.astimezone()  # local time, as the user reads a clock
        return Point("time", (dt - _EPOCH) // _US * 1000)
    except (ValueError, OverflowError, OSError):  # e.g. 0001-01-01T00:00:00 west of its zone: year 0
        raise PointError(f"{_show(s)} is outside the times a history can hold: {HELP}") from None


def _show(s: str) -> str:
    """`s` quoted for a one-line message, cut short if long."""
    return repr(s if len(s) <= 60 else s[:57] + "...")


def check_mark_name(name: str) -> str:
    """Mark names become file names (FUSE at/mark:NAME.img) and URIs: keep them tame."""
    if not MARK_NAME.match(name):
        raise PointError(
            f"bad mark name {name!r}: use 1-100 letters, digits, spaces or ._+@:,=- (starting with a letter or digit)"
        )
    return name


def format_ns(t: int) -> str:
    """A local ISO time with milliseconds, for messages and listings."""
    return datetime.fromtimestamp(t / 1e9).astimezone().isoformat(timespec="milliseconds")
