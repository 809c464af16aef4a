"""Terminal progress bar for jobs (export, rewind, verify, fade), and the Ctrl-C rule around them.

The bar is drawn on stderr only when stderr is a terminal, so scripts and pipes see nothing but the
result. The first Ctrl-C asks the job to cancel (it cleans up after itself); a second one exits
at once, for a job that is stuck.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any, Protocol, TextIO

from .errors import Cancelled
from .jobs import Progress


class Interrupted(Cancelled):
    """A job the user cancelled with Ctrl-C: exit status 130, like an interrupted shell command."""

    exit_code = 130


class Cancellable(Protocol):
    """What `run_job` needs: iteration yielding Progress, cancel(), and a result afterwards."""

    def __iter__(self) -> Iterator[Progress]: ...

    def cancel(self) -> None: ...


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes read at a glance."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    v = float(n)
    for unit in units:
        if abs(v) < 1024 or unit == units[-1]:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} PiB"  # pragma: no cover - loop always returns


def human_duration(s: float) -> str:
    """Seconds as 42s, 3m07s, 1h02m: short enough for an ETA column."""
    if s != s or s < 0 or s > 360000:  # NaN, negative or absurd
        return "--"
    s = int(s + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# Phases whose Progress counts bytes (export, the journal scan of verify); others count items
# (blocks, map entries), shown as a plain rate.
BYTE_PHASES = frozenset({"export", "journal", "copy", "read", "write", "compact"})


def human_count(n: float) -> str:
    """12345 -> '12.3k': item rates (blocks, entries) at a glance."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


class ProgressBar:
    """Draws `label [#####.....] 42%  12.3 MiB/s  ETA 8s` on one line, redrawn in place."""

    def __init__(self, label: str, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.label = label
        self.stream: TextIO = stream if stream is not None else sys.stderr
        if enabled is None:
            try:
                enabled = self.stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self._drawn = False
        self._start = time.monotonic()

    def line(self, ev: Progress, width: int = 80) -> str:
        """The text of the bar for `ev` (without carriage return), fitting `width` columns."""
        frac = min(max(ev.fraction, 0.0), 1.0)
        rate = ev.rate
        if rate <= 0:
            rate = ev.done / max(time.monotonic() - self._start, 1e-9)
        eta = (ev.total - ev.done) / rate if rate > 0 and ev.total > ev.done else 0.0
        phase = f" {ev.phase}" if ev.phase and ev.phase != self.label else ""
        speed = human_bytes(rate) if ev.phase in BYTE_PHASES else human_count(rate)
        tail = f" {frac * 100:5.1f}%  {speed}/s  ETA {human_duration(eta)}"
        head = f"{self.label}{phase} "
        bar_w = max(10, width - len(head) - len(tail) - 3)
        fill = int(frac * bar_w)
        return f"{head}[{'#' * fill}{'.' * (bar_w - fill)}]{tail}"[: max(width - 1, 20)]

    def update(self, ev: Progress) -> None:
        if not self.enabled:
            return
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + self.line(ev, width))
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the bar's line so that what follows starts on a fresh one."""
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class _InterruptGuard:
    """SIGINT handler for the duration of a job: first Ctrl-C cancels, second interrupts."""

    def __init__(self, job: Cancellable, bar: ProgressBar) -> None:
        self.job = job
        self.bar = bar
        self.hits = 0
        self._old: Any = None
        self._installed = False

    def __enter__(self) -> _InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.hits += 1
        if self.hits == 1:
            if self.bar.enabled:
                self.bar.finish()
            try:
                sys.stderr.write("rewind: cancelling (Ctrl-C again to quit at once)\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            self.job.cancel()
            return
        raise KeyboardInterrupt


def run_job(job: Cancellable | Iterable[Progress], label: str, stream: TextIO | None = None) -> int:
    """Drive `job` to its end with a bar on a terminal. Returns how many Ctrl-C were pressed
    (0 normally); errors from the job (Cancelled included) propagate to the caller."""
    bar = ProgressBar(label, stream)
    if not hasattr(job, "cancel"):
        try:
            for ev in job:
                bar.update(ev)
        finally:
            bar.finish()
        return 0
    guard = _InterruptGuard(job, bar)  # type: ignore[arg-type]
    with guard:
        try:
            for ev in job:
                bar.update(ev)
        except Cancelled as e:
            if guard.hits:
                raise Interrupted(f"{label} cancelled; nothing was left half-done") from e
            raise
        finally:
            bar.finish()
    if guard.hits:
        raise Interrupted(f"{label} was interrupted")  # finished anyway, but the user asked to stop
    return guard.hits


def is_interactive() -> bool:
    """True when both stdin and stderr are terminals (a person is there to answer)."""
    try:
        return os.isatty(sys.stdin.fileno()) and os.isatty(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):
        return False
