"""Long work (export, rewind, verify, fade) as jobs: generators of small typed progress events,
throttled to a few per second, with cooperative cancel (borg / napari style)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import Cancelled


@dataclass(frozen=True)
class Progress:
    """Where a job is: `done` of `total` units (bytes or blocks), `rate` units per second."""

    phase: str
    done: int
    total: int
    rate: float = 0.0

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


# A job body yields Progress; it must call check() (passed in) at safe points.
JobBody = Callable[[Callable[[], None]], Generator[Progress, None, Any]]


class HasState(Protocol):
    state: str
    error: BaseException | None


def end_state(job: HasState, e: BaseException) -> None:
    """Record how a job ended on an exception: cancelled, or failed."""
    job.state = "cancelled" if isinstance(e, Cancelled) else "failed"
    job.error = e


class Job:
    """Runs `body` when iterated or run(). States: pending, running, done, cancelled, failed."""

    THROTTLE_S = 0.2

    def __init__(self, name: str, body: JobBody) -> None:
        self.name = name
        self._body = body
        self._cancel = threading.Event()
        self.state = "pending"
        self.result: Any = None
        self.error: BaseException | None = None
        self.last: Progress | None = None

    def cancel(self) -> None:
        """Ask the job to stop at its next safe point; it cleans up after itself."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled(f"{self.name} cancelled")

    def __iter__(self) -> Iterator[Progress]:
        if self.state != "pending":
            raise RuntimeError(f"job {self.name} already {self.state}")
        self.state = "running"
        last_emit = 0.0
        start = time.monotonic()
        gen = self._body(self._check)
        try:
            while True:
                try:
                    ev = next(gen)
                except StopIteration as stop:
                    self.result = stop.value
                    break
                now = time.monotonic()
                elapsed = max(now - start, 1e-9)
                ev = Progress(ev.phase, ev.done, ev.total, ev.rate or ev.done / elapsed)
                self.last = ev
                if now - last_emit >= self.THROTTLE_S or ev.done >= ev.total:
                    last_emit = now
                    yield ev
        except BaseException as e:
            end_state(self, e)
            raise
        finally:
            gen.close()
        self.state = "done"

    def run(self, on_event: Callable[[Progress], None] | None = None) -> Any:
        """Drive the job to its end in this thread; returns its result or raises its error."""
        for ev in self:
            if on_event is not None:
                on_event(ev)
        return self.result


__all__ = ["Job", "Progress", "JobBody", "Cancelled", "end_state"]
