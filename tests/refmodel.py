"""Plain references for tests: a clock moved by hand and a copy of the volume per point."""

from __future__ import annotations


class Clock:
    """A clock tests move by hand (ns)."""

    def __init__(self, start: int = 1_800_000_000 * 10**9) -> None:
        self.t = start

    def __call__(self) -> int:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += int(seconds * 1e9)


class Model:
    """The reference: a bytearray per point in time (seq -> contents)."""

    def __init__(self, size: int) -> None:
        self.cur = bytearray(size)
        self.points: dict[int, bytes] = {}

    def write(self, off: int, data: bytes) -> None:
        self.cur[off : off + len(data)] = data

    def zero(self, off: int, n: int) -> None:
        self.cur[off : off + n] = bytes(n)

    def snap(self, seq: int) -> None:
        self.points[seq] = bytes(self.cur)
