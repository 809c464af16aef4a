"""The engine, bridged to Qt signals. One VolumeWorker per protection owns its store in a thread
of its own (opening, refreshing, previews, marks, serving); long jobs (export, rewind, verify) run
in a second thread of the same volume so previews stay live while a job runs. The GUI thread
only posts requests and receives signals: it never waits on disk.

Preview requests carry a generation number; a request that is no longer the newest when the
worker reaches it is skipped, and a result that arrives late is dropped by the view.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import QCoreApplication, QObject, QThread, Signal, Slot
from rewind.engine.safefile import write_replace

from .link import Link, WatchedStore, preview_retention
from .preview import PreviewBuilder
from .stats import ChartData, StatSeries


@dataclass
class Snapshot:
    """What the volume view shows besides the preview: refreshed about once a second."""

    head: int
    horizon: int
    head_time: int
    horizon_time: int
    marks: list[Any]
    chart: ChartData | None  # None: the history's statistics did not change since the last one
    total_writes: int
    journal_bytes: int
    records: int
    served: str  # "" or the NBD URI
    connections: int
    remote: bool
    primary: str
    size: int
    block_size: int
    demo: dict[str, Any] = field(default_factory=dict)
    max_size: int | None = None  # the journal's space limit (retention), None = unlimited
    on_full: str = ""  # what happens at the limit: "fade" (oldest history goes) or "refuse"
    retention: dict[str, Any] = field(default_factory=dict)  # store.retention(): policy, faded_early...
    # the journal curve with the sizes measured after fades spliced in (None: use chart.journal)
    journal_xy: tuple[np.ndarray, np.ndarray] | None = None


MAX_JOURNAL_SAMPLES = 1000


def splice_journal(x: np.ndarray, jr: np.ndarray, samples: list[tuple[float, int]],
                   row_t: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The journal curve (x in s, MiB) with sizes measured after fades: the engine records the
    journal's size with each second of writes, so a fade shows only at the next write; each
    sample (time, bytes) drops the curve at its time until the next second with writes."""
    for ts, jb in sorted(samples):
        k = bisect.bisect_right(row_t, int(ts))
        t_next = float(row_t[k]) if k < len(row_t) else float("inf")
        i = int(np.searchsorted(x, ts, "right"))
        j = max(i, int(np.searchsorted(x, t_next, "left")))
        old = float(jr[i - 1]) if i > 0 else 0.0
        new = jb / 2**20
        x = np.concatenate([x[:i], [ts, ts], x[i:j], x[j:]])
        jr = np.concatenate([jr[:i], [old, new], np.full(j - i, new), jr[j:]])
    return x, jr


class _Runner(QObject):
    """Runs callables posted from other threads, in the thread it lives in."""

    @Slot(object)
    def run(self, fn: Callable[[], None]) -> None:
        fn()


class _Lane(QObject):
    """A thread plus a runner: post(fn) runs fn there, in order."""

    post = Signal(object)

    def __init__(self, name: str) -> None:
        super().__init__()
        self.qthread = QThread()  # not `thread`: that would hide QObject.thread()
        self.qthread.setObjectName(name)
        self.runner = _Runner()
        self.runner.moveToThread(self.qthread)
        self.post.connect(self.runner.run)
        self.qthread.start()

    def stop(self, timeout_ms: int = 30000) -> bool:
        self.qthread.quit()
        if not self.qthread.wait(timeout_ms):
            _STUCK.append(self)  # a QThread destroyed while it runs aborts the process: keep it
            return False
        # requests still queued (quit() leaves them) hold closures over the worker, a cycle through
        # C++ that Python cannot collect: drop them now, in this thread, not at interpreter exit
        QCoreApplication.removePostedEvents(self.runner)
        return True


_STUCK: list[_Lane] = []  # lanes whose thread did not stop in time (never destroyed)


def describe(e: BaseException) -> str:
    """A one-line description of an error: engine errors already say what to do."""
    msg = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.errno == 28:
        return f"The disk is full ({e.filename or 'no space left'}): free some space, then try again."
    if isinstance(e, FileNotFoundError):
        return f"{e.filename or msg} is missing: it was moved or deleted. Put it back, or open another protection."
    return msg


class VolumeWorker(QObject):
    """The console's side of one protection. Methods are called from the GUI thread; they post
    work to this volume's threads and answer through signals."""

    opened = Signal(object)  # Snapshot
    failed = Signal(str, object)  # what was being done, exception
    snapshot = Signal(object)  # Snapshot
    previewReady = Signal(int, object)  # generation, Preview
    previewFailed = Signal(int, object)  # generation, exception
    fileReady = Signal(str, object, object)  # purpose, path, bytes
    confirmInfo = Signal(int, object)  # seq, {"blocks": n, "bytes": n}
    marked = Signal(object)  # Mark
    marksEdited = Signal(str, str)  # action ("rename" | "remove" | "keep"), the mark's name
    fadePreview = Signal(str, object)  # then ("fade" | "apply"), store.fade_preview()
    jobStarted = Signal(str)
    jobProgress = Signal(str, object)  # kind, Progress
    jobDone = Signal(str, object)  # kind, result
    jobFailed = Signal(str, object)  # kind, exception (Cancelled when cancelled)
    engineEvent = Signal(str, object)  # engine listener events, bridged
    retentionPreview = Signal(int, object)  # generation, RetentionPreview or the exception
    retentionApplied = Signal(object)  # the store's retention settings after an Apply
    retentionFailed = Signal(str)  # one line: why the settings were refused
    serveChanged = Signal(str)  # "" stopped, else the URI
    writeFailed = Signal(str, object)  # a write through the console's own NBD server failed
    closed = Signal()

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.link: Link | None = None
        self.builder: PreviewBuilder | None = None
        self.lane = _Lane(f"rewind-volume-{name}")  # open, refresh, marks, serve, files
        self.preview_lane = _Lane(f"rewind-preview-{name}")  # previews never wait behind a refresh
        self.job_lane = _Lane(f"rewind-job-{name}")  # export / rewind / verify
        self.preview_gen = 0
        self.job: Any = None
        self.job_kind = ""
        self.server: Any = None
        self.demo: Any = None  # DemoWorkload when this is the demo
        self.demo_log: Any = None
        self._stats_last_t: int | None = None
        self.series = StatSeries()  # the whole history's per-second rows (this worker's thread only)
        self._closing = False
        self._listener = self._on_engine_event
        self._last_write_error = -1e9
        self.retention_gen = 0
        # journal sizes measured right after fades (time s, bytes): engine threads append
        self.journal_samples: list[tuple[float, int]] = []
        self._samples_seen = 0
        # kept so a view made after the store opened (or failed) still learns of it
        self.opened_snapshot: Snapshot | None = None
        self.open_error: BaseException | None = None

    # -- plumbing -----------------------------------------------------------------------------
    def _guard(self, what: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if self._closing and what not in ("close", "stop-serve"):
                return
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported, never fatal
                e.__rewind_traceback__ = traceback.format_exc()  # type: ignore[attr-defined]
                if what in ("open", "create", "demo") and self.link is None:
                    self.open_error = e
                self.failed.emit(what, e)
        return run

    def _post(self, what: str, fn: Callable[[], None]) -> None:
        self.lane.post.emit(self._guard(what, fn))

    def _on_engine_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "fade" and isinstance(data.get("journal_after"), int):
            self.journal_samples.append((time.time(), int(data["journal_after"])))
            del self.journal_samples[:-MAX_JOURNAL_SAMPLES]
        self.engineEvent.emit(kind, dict(data))

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Between two operations of the demo workload (no-op otherwise)."""
        demo = self.demo
        if demo is not None and demo.is_alive():
            with demo.paused():
                yield
        else:
            yield

    # -- opening --------------------------------------------------------------------------------
    def open(self, store_dir: str) -> None:
        self._post("open", lambda: self._opened(Link.open(store_dir)))

    def create(self, primary: str, store_dir: str, size: int | None) -> None:
        self._post("create", lambda: self._opened(Link.create(primary, store_dir, size)))

    def create_demo(self, root: str | None = None, interval: float = 0.15, seed: int | None = None) -> None:
        def run() -> None:
            from .demo import DemoLog, create_demo_store

            store = create_demo_store(Path(root) if root else None)
            self.demo_log = DemoLog()
            self._opened(Link(store))
            self.start_demo(interval=interval, seed=seed)
        self._post("demo", run)

    def _opened(self, link: Link) -> None:
        self.link = link
        self.builder = PreviewBuilder(link)
        link.add_listener(self._listener)
        snap = self._snapshot()
        self.opened_snapshot = snap
        self.opened.emit(snap)

    def take_over(self) -> None:
        """Open the store directly once the `rewind serve` this console was attached to stopped
        (if one still holds it, this attaches to that one again, or says who holds it)."""
        def run() -> None:
            old = self.link
            assert old is not None
            with contextlib.suppress(Exception):
                old.remove_listener(self._listener)
            with contextlib.suppress(Exception):
                old.close()
            link = Link.open(old.dir)
            self.link = link
            self.builder = PreviewBuilder(link)
            link.add_listener(self._listener)
            self._stats_last_t = None  # the statistics are read afresh from the store itself
            self.snapshot.emit(self._snapshot())
        self._post("take-over", run)

    # -- demo workload --------------------------------------------------------------------------
    def start_demo(self, interval: float = 0.15, seed: int | None = None) -> None:
        """(Re)start the demo workload on the demo volume (worker thread or GUI thread)."""
        from .demo import DemoLog, DemoWorkload

        if self.link is None or self._closing:
            return
        if self.demo_log is None:
            self.demo_log = DemoLog()
        if self.demo is not None and self.demo.is_alive():
            return

        def on_error(e: BaseException) -> None:
            self.failed.emit("demo", e)

        self.demo = DemoWorkload(self.link.store, self.demo_log, seed=seed, interval=interval,
                                 on_error=on_error)
        self.demo.start()

    def stop_demo(self) -> None:
        if self.demo is not None:
            self.demo.stop()

    @property
    def demo_running(self) -> bool:
        return self.demo is not None and self.demo.is_alive()

    # -- refresh --------------------------------------------------------------------------------
    def refresh(self) -> None:
        self._post("refresh", lambda: self.snapshot.emit(self._snapshot()))

    def _snapshot(self) -> Snapshot:
        link = self.link
        assert link is not None
        info = link.info() if link.remote else {}
        reset = self._stats_last_t is None
        since = None if reset else self._stats_last_t * 10**9  # type: ignore[operator]
        rows = link.stats(since_ns=since)
        if rows:
            self._stats_last_t = int(rows[-1].t)
        elif reset:
            self._stats_last_t = 0
        head, horizon = link.head, link.horizon
        changed = self.series.merge(rows, reset)
        samples = list(self.journal_samples)
        if len(samples) != self._samples_seen:
            self._samples_seen = len(samples)
            changed = True
        now_s = time.time()
        chart = self.series.chart(until=now_s) if changed else None
        journal_xy = None
        if chart is not None and samples:
            journal_xy = splice_journal(chart.x, chart.journal, samples, self.series.t)
        journal = int(self.series.journal[-1]) if self.series.journal else -1
        if samples and (not self.series.t or samples[-1][0] >= self.series.t[-1] + 1):
            journal = samples[-1][1]  # measured after a fade, newer than the last second of writes
        if link.remote:
            journal = int(info.get("journal_bytes", journal))
        retention = link.retention()
        max_size = retention.get("max_size")
        demo: dict[str, Any] = {}
        if self.demo is not None:
            demo = {"running": self.demo.is_alive(), "ops": self.demo.ops, "files": len(self.demo.files),
                    "paced": self.demo.is_alive() and self.demo.paced, "busy_s": self.demo.busy_s}
        return Snapshot(
            head=head, horizon=horizon, head_time=link.point_time(head), horizon_time=link.point_time(horizon),
            marks=link.marks(), chart=chart, total_writes=self.series.total_writes, journal_bytes=journal,
            records=head,
            served=self.server.uri if self.server is not None else "",
            connections=int(getattr(self.server, "connections", 0)) if self.server is not None else 0,
            remote=link.remote, primary=link.primary_path, size=link.size, block_size=link.block_size,
            demo=demo, max_size=int(max_size) if isinstance(max_size, int) and max_size > 0 else None,
            on_full=str(retention.get("on_full") or ""), retention=retention, journal_xy=journal_xy,
        )

    # -- previews -------------------------------------------------------------------------------
    def request_preview(self, target: tuple[str, int]) -> int:
        """Ask for the preview at ("seq", n), ("time", ns) or ("now", 0); returns its generation.
        A point retention merged away gives the nearest kept one (("next"/"prev", n): the kept
        one after/before n)."""
        self.preview_gen += 1
        gen = self.preview_gen

        def run() -> None:
            if gen != self.preview_gen or self.link is None or self.builder is None:
                return  # a newer request is queued: skip this one
            try:
                link = self.link
                with self._quiet():
                    head = link.head
                    kind, value = target
                    if kind in ("seq", "next", "prev"):  # next/prev: an arrow key's step
                        seq = max(link.horizon, min(int(value), head))
                        seq = link.kept_point(seq, {"next": 1, "prev": -1}.get(kind, 0))
                    elif kind == "time":
                        seq = link.kept_point(link.seq_at_time(int(value)), t_ns=int(value))
                    else:
                        seq = head
                    if gen != self.preview_gen:
                        return
                    # the tree "now" is read at `head` so the comparison is consistent
                    preview = self.builder.build(seq, head)
            except Exception as e:  # noqa: BLE001
                self.previewFailed.emit(gen, e)
                return
            if gen == self.preview_gen:
                self.previewReady.emit(gen, preview)

        self.preview_lane.post.emit(run)
        return gen

    def read_file(self, purpose: str, seq: int, path: str, limit: int | None = None) -> None:
        def run() -> None:
            assert self.builder is not None
            self.fileReady.emit(purpose, path, self.builder.read_file(seq, path, limit))
        self._post("read-file", run)

    def read_block(self, seq: int, block: int) -> None:
        """One block as it was at `seq` (the hex view of the block map)."""
        def run() -> None:
            assert self.link is not None
            bs = self.link.block_size
            self.fileReady.emit("block", block, self.link.at(seq).read(block * bs, bs))
        self._post("read-block", run)

    def save_file(self, seq: int, path: str, dest: str) -> None:
        """Restore one file as it was at `seq` into `dest` (written beside, then renamed)."""
        def run() -> None:
            assert self.builder is not None
            data = self.builder.read_file(seq, path)
            write_replace(dest, data)  # a random O_EXCL|O_NOFOLLOW name, 0600: nothing planted is followed
            self.fileReady.emit("saved", dest, len(data))
        self._post("save-file", run)

    def confirm_rewind_info(self, seq: int) -> None:
        """How much a rewind to `seq` would change (for the confirmation dialog)."""
        def run() -> None:
            assert self.link is not None
            blocks = self.link.changed_blocks(seq, self.link.head)
            self.confirmInfo.emit(seq, {"blocks": len(blocks), "bytes": len(blocks) * self.link.block_size})
        self._post("rewind-check", run)

    # -- retention ------------------------------------------------------------------------------
    def preview_retention(self, policy: str) -> int:
        """Work out what `policy` keeps of the history (answers retentionPreview); returns the
        request's generation (older answers are stale)."""
        self.retention_gen += 1
        gen = self.retention_gen

        def run() -> None:
            if gen != self.retention_gen or self.link is None:
                return
            link = self.link
            try:
                horizon = link.horizon
                p = preview_retention(policy, list(self.series.t), list(self.series.writes), link.marks(),
                                      link.point_time(horizon), time.time_ns())
                try:
                    exact = link.fade_preview(policy)  # what the fade itself would remove
                except Exception:  # noqa: BLE001 - an older serve: the estimate alone is shown
                    exact = None
                if exact is not None:
                    p.marks_fading = [str(m) for m in exact.get("marks", [])]
                    p.points_removed = int(exact.get("points", 0))
            except Exception as e:  # noqa: BLE001 - a bad policy is answered, not raised
                self.retentionPreview.emit(gen, e)
                return
            self.retentionPreview.emit(gen, p)
        self._post("retention-preview", run)
        return gen

    def apply_retention(self, policy: str | None, max_size: int | None, on_full: str | None) -> None:
        """store.set_retention; a refusal (BadInput) comes back as one line, never a dialog."""
        def run() -> None:
            assert self.link is not None
            try:
                r = self.link.set_retention(policy=policy, max_size=max_size, on_full=on_full)
            except Exception as e:  # noqa: BLE001
                self.retentionFailed.emit(" ".join(str(e).split()) or type(e).__name__)
                return
            self.retentionApplied.emit(r)
            self.snapshot.emit(self._snapshot())
        self._post("retention", run)

    def fade(self) -> None:
        """Apply retention now, as a job (progress, cancel)."""
        self.run_job("fade", lambda link: link.fade())

    # -- actions --------------------------------------------------------------------------------
    def mark(self, name: str) -> None:
        """A person's mark (Mark now): kept until they remove it."""
        def run() -> None:
            assert self.link is not None
            with self._quiet():
                m = self.link.mark(name, pinned=True)
            self.marked.emit(m)
            self.snapshot.emit(self._snapshot())
        self._post("mark", run)

    def edit_mark(self, action: str, name: str, new_name: str = "") -> None:
        """The marks list: "remove", "rename" (a new mark at the same point, then the old one
        removed: both journaled), "keep" (a mark the program made is kept until removed)."""
        def run() -> None:
            link = self.link
            assert link is not None
            m = next((x for x in link.marks() if x.name == name), None)
            if m is None:
                raise ValueError(f"the mark {name!r} is gone (removed, or faded with its point)")
            if action == "rename":
                link.mark(new_name, pinned=bool(m.pinned), at=int(m.seq))
                link.unmark(name)
            elif action == "remove":
                link.unmark(name)
            elif action == "keep":
                link.pin(name, True)
            self.marksEdited.emit(action, name)
            self.snapshot.emit(self._snapshot())
        self._post("mark", run)

    def fade_preview(self, policy: str | None, then: str) -> None:
        """What a fade under `policy` would remove (answers fadePreview with `then`: what the view
        does once the person agrees, "fade" or "apply")."""
        def run() -> None:
            assert self.link is not None
            self.fadePreview.emit(then, self.link.fade_preview(policy))
        self._post("fade-preview", run)

    def start_serve(self, address: str = "unix:") -> None:
        def run() -> None:
            from rewind.engine.frontends.nbd.server import NbdServer

            assert self.link is not None and not self.link.remote
            if self.server is None:
                store = WatchedStore(self.link.store, self._write_failed)
                self.server = NbdServer(store, address).start()
            self.serveChanged.emit(self.server.uri)
        self._post("serve", run)

    def _write_failed(self, op: str, e: BaseException) -> None:
        """A client's write through our NBD server failed (NBD thread): tell the view, at most
        once every 10 s (a failing disk fails every write)."""
        now = time.monotonic()
        if now - self._last_write_error < 10:
            return
        self._last_write_error = now
        self.writeFailed.emit(op, e)

    def stop_serve(self) -> None:
        def run() -> None:
            srv, self.server = self.server, None
            if srv is not None:
                srv.stop()
            self.serveChanged.emit("")
        self._post("stop-serve", run)

    # -- jobs -----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.job is not None

    def run_job(self, kind: str, make: Callable[[Link], Any], before: Callable[[], None] | None = None,
                after: Callable[[], None] | None = None) -> None:
        """Run a job (export/rewind/verify) in the job thread, reporting progress as signals."""
        if self.job is not None:
            raise RuntimeError(f"{self.job_kind} is still running")
        self.job_kind = kind
        self.job = "starting"

        def run() -> None:
            try:
                if before is not None:
                    before()
                assert self.link is not None
                job = make(self.link)
                self.job = job
                if self._cancel_requested:
                    job.cancel()
                self.jobStarted.emit(kind)
                for ev in job:
                    self.jobProgress.emit(kind, ev)
                result = job.result
            except Exception as e:  # noqa: BLE001 - Cancelled included: the view tells them apart
                e.__rewind_traceback__ = traceback.format_exc()  # type: ignore[attr-defined]
                self.job = None
                self._cancel_requested = False
                if after is not None:
                    with contextlib.suppress(Exception):
                        after()
                self.jobFailed.emit(kind, e)
                return
            self.job = None
            self._cancel_requested = False
            if after is not None:
                with contextlib.suppress(Exception):
                    after()
            self.jobDone.emit(kind, result)

        self._cancel_requested = False
        self.job_lane.post.emit(run)

    _cancel_requested = False

    def cancel_job(self) -> None:
        """Ask the running job to stop at its next safe point (it removes what it was writing)."""
        self._cancel_requested = True
        job = self.job
        if job is not None and not isinstance(job, str):
            job.cancel()

    def export(self, seq: int, out: str) -> None:
        self.run_job("export", lambda link: link.export(seq, out))

    def verify(self) -> None:
        self.run_job("verify", lambda link: link.verify())

    def rewind(self, seq: int) -> None:
        """Rewind; the demo workload pauses around it (its in-memory filesystem state would be stale)."""
        restart = self.demo_running

        def before() -> None:
            self.stop_demo()

        def after() -> None:
            if restart:
                self.start_demo(interval=self.demo.interval if self.demo is not None else 0.15)

        self.run_job("rewind", lambda link: link.rewind(seq), before=before, after=after)

    # -- closing --------------------------------------------------------------------------------
    def close(self, timeout_s: float = 30.0) -> None:
        """Stop everything this volume runs (job, demo, server), close the store, end the threads.
        Blocks the caller until done (used when a volume or the window closes)."""
        self.cancel_job()
        self._closing = True
        self.stop_demo()
        done = threading.Event()

        def run() -> None:
            try:
                srv, self.server = self.server, None
                if srv is not None:
                    with contextlib.suppress(Exception):
                        srv.stop()
                if self.link is not None:
                    with contextlib.suppress(Exception):
                        self.link.remove_listener(self._listener)
                    self.link.close()
            finally:
                done.set()

        # the job thread first: a cancelled job cleans up before the store closes
        self.preview_gen += 1  # queued previews are skipped
        self.job_lane.stop(int(timeout_s * 1000))
        self.preview_lane.stop(int(timeout_s * 1000))
        self.lane.post.emit(self._guard("close", run))
        deadline = time.monotonic() + timeout_s
        while not done.is_set() and time.monotonic() < deadline:
            done.wait(0.05)
        self.lane.stop(int(timeout_s * 1000))
        self.closed.emit()
        self._disconnect_all()

    def _disconnect_all(self) -> None:
        """Nothing of a closed volume is called again, and the lambdas connected to its signals
        (which hold its view, which holds this worker: a cycle through C++ that Python cannot
        collect) go: the worker and its threads' objects are freed now, in the GUI thread, not in
        whatever order the interpreter's exit picks after the QApplication is gone."""
        for name, value in vars(VolumeWorker).items():
            if isinstance(value, Signal):
                with warnings.catch_warnings(), contextlib.suppress(RuntimeError, TypeError):
                    warnings.simplefilter("ignore")
                    getattr(self, name).disconnect()

