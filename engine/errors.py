"""Errors the engine raises. Each carries the exit status the CLI gives and a one-line message
that says what went wrong and what to do, so no front end needs to print a traceback."""

from __future__ import annotations


class RewindError(Exception):
    """Base of every engine error; `exit_code` is the CLI's exit status for it."""

    exit_code = 1


class BadInput(RewindError):
    """The caller asked for something invalid (bad path, point, size, name): exit 2."""

    exit_code = 2


class PointError(BadInput):
    """A POINT that does not parse or is not (or no longer) addressable."""


class ReadOnlyError(RewindError):
    """A write to a past point in time, which is read-only."""


class StoreLocked(RewindError):
    """Another process (usually `rewind serve`) holds the store's lock."""


class CorruptionError(RewindError):
    """A checksum failed: the data is never served; `path` and `offset` say where."""

    def __init__(self, message: str, path: str = "", offset: int = -1) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class NoSpace(RewindError):
    """The journal reached its space limit and the policy says refuse new writes."""


class Cancelled(RewindError):
    """A job was cancelled; whatever it was writing has been removed."""
