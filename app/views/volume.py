"""One protection: charts of its history, the timeline, the preview of the chosen point, and the
actions (mark, export, rewind and undo, serve, verify). Talks to its VolumeWorker only."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QApplication,
    QFrame,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)
from rewind.engine.errors import Cancelled

from ..dialogs import files
from ..dialogs.errors import show_error, show_info
from ..dialogs.jobs import JobDialog, RewindConfirm
from ..format import human_bytes, human_time
from ..preview import Preview
from ..workers import Snapshot, VolumeWorker
from .charts import Charts
from .marks import MarksPage
from .preview import PreviewPane
from .retention import RetentionPage
from .timeline import Timeline

PREVIEW_THROTTLE_MS = 60  # at most ~16 preview requests a second while dragging
FOLLOW_NOW_MS = 1500  # how often the preview of "now" refreshes while writes go on


class InfoBar(QFrame):
    """A one-line message with an optional action button (e.g. Undo after a rewind)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("infoBar")
        self.label = QLabel("")
        self.label.setWordWrap(True)  # long results (a fade's) wrap instead of being cut off
        self.button = QPushButton("")
        self.close_button = QToolButton()
        self.close_button.setText("✕")
        self.close_button.setAutoRaise(True)
        self.close_button.clicked.connect(self.hide)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(10, 4, 6, 4)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.button)
        lay.addWidget(self.close_button)
        self._action: Any = None
        self.button.clicked.connect(self._run)
        self.hide()

    def show_message(self, text: str, action: str = "", fn: Any = None) -> None:
        self.label.setText(text)
        self._action = fn
        self.button.setText(action)
        self.button.setVisible(bool(action))
        self.show()

    def _run(self) -> None:
        if self._action is not None:
            self._action()


class VolumeView(QWidget):
    """The view of one protection. `state` is a short text for the side list."""

    stateChanged = Signal(str)
    statusChanged = Signal(object)  # Snapshot (for the window's status bar)
    notify = Signal(str, str, str)  # title, message, level ("info" | "warning" | "critical")
    titleChanged = Signal(str)
    openFailed = Signal()  # the store could not be opened and the user has read why: drop the entry

    def __init__(self, worker: VolumeWorker, title: str, demo: bool = False,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.worker = worker
        self.title = title
        self.demo = demo
        self.snap: Snapshot | None = None
        self.preview: Preview | None = None
        self.state = "Opening..."
        self.error: BaseException | None = None
        self._refresh_pending = False
        self._pending_target: tuple[str, int] | None = None
        self._last_preview_head = -1
        self._last_preview_at = 0.0
        self.job_dialog: JobDialog | None = None
        self.rewind_dialog: RewindConfirm | None = None
        self.fade_dialog: Any = None  # the fade confirmation while it is open
        self._pending_retention: tuple[str, int, str] | None = None
        self.export_path = ""
        self._undo_mark = ""
        self.shown_gen = 0  # generation of the preview on screen (benchmarks wait on it)
        self._opened = False
        self._space_warned = False
        self._refresh_failing = False
        self._faded_seen_ns: int | None = None
        self._faded_checked = False
        self._last_write_notice = -1e9
        self._build()
        self._connect()
        # the store may have opened (or failed) before this view existed: catch up
        if worker.opened_snapshot is not None:
            QTimer.singleShot(0, self, lambda: self._on_opened(worker.opened_snapshot))
        elif worker.open_error is not None:
            QTimer.singleShot(0, self, lambda: self._on_failed("open", worker.open_error))

    # -- layout ---------------------------------------------------------------------------------
    def _build(self) -> None:
        self.title_label = QLabel(self.title)
        self.title_label.setObjectName("heroTitle")
        self.title_label.setStyleSheet("font-size: 15pt;")
        self.subtitle = QLabel("Opening...")
        self.subtitle.setObjectName("muted")
        self.mark_button = QPushButton("Mark now")
        self.mark_button.setToolTip("Name the present moment so you can come back to it (Ctrl+M)")
        self.export_button = QPushButton("Export this point...")
        self.export_button.setToolTip("Write a new image file equal to the volume at the timeline's point")
        self.rewind_button = QPushButton("Rewind to this point...")
        self.rewind_button.setToolTip("Make the volume equal to the timeline's point (undoable)")
        self.serve_button = QPushButton("Serve")
        self.serve_button.setCheckable(True)
        self.serve_button.setToolTip("Serve the live volume over NBD (a unix socket) for VMs and tools")
        self.verify_button = QPushButton("Verify")
        self.verify_button.setToolTip("Check every checksum of the history")
        self.demo_button = QPushButton("Pause demo")
        self.demo_button.setVisible(self.demo)
        self.demo_button.setToolTip("Pause or resume the demo's file workload")
        actions = QHBoxLayout()
        for b in (self.mark_button, self.export_button, self.rewind_button, self.serve_button,
                  self.verify_button, self.demo_button):
            actions.addWidget(b)
        actions.addStretch(1)
        head = QVBoxLayout()
        head.setSpacing(2)
        head.addWidget(self.title_label)
        head.addWidget(self.subtitle)
        head.addLayout(actions)

        self.info_bar = InfoBar()
        self.serve_row = QFrame()
        self.serve_uri = QLineEdit()
        self.serve_uri.setReadOnly(True)
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the NBD URI (for qemu, nbdinfo, nbdfuse, fio)")
        self.copy_button.clicked.connect(self._copy_uri)
        sr = QHBoxLayout(self.serve_row)
        sr.setContentsMargins(0, 0, 0, 0)
        sr.addWidget(QLabel("Served at"))
        sr.addWidget(self.serve_uri, 1)
        sr.addWidget(self.copy_button)
        self.serve_row.hide()

        self.charts = Charts()
        self.timeline = Timeline()
        self.point_label = QLabel("now")
        self.point_label.setObjectName("pointLabel")
        self.point_hint = QLabel("←/→ one record · PgUp/PgDn mark to mark · Home/End horizon/now")
        self.point_hint.setObjectName("muted")
        tl = QWidget()
        tll = QVBoxLayout(tl)
        tll.setContentsMargins(0, 0, 0, 0)
        tll.setSpacing(2)
        tll.addWidget(self.timeline)
        row = QHBoxLayout()
        row.addWidget(self.point_label, 1)
        row.addWidget(self.point_hint)
        tll.addLayout(row)
        self.preview_pane = PreviewPane()

        top = QWidget()
        tv = QVBoxLayout(top)
        tv.setContentsMargins(0, 0, 0, 0)
        tv.addWidget(self.charts, 1)
        tv.addWidget(tl)
        self.split = QSplitter(Qt.Orientation.Vertical)
        self.split.addWidget(top)
        self.split.addWidget(self.preview_pane)
        self.split.setStretchFactor(0, 5)
        self.split.setStretchFactor(1, 4)
        self.split.setChildrenCollapsible(False)
        self.retention_page = RetentionPage(self.worker)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.split, "History")
        self.tabs.addTab(self.retention_page, "Retention")
        self.tabs.setTabToolTip(1, "How long history is kept, the journal's space limit, Fade now")
        self.marks_page = MarksPage()
        self.tabs.addTab(self.marks_page, "Marks")
        self.tabs.setTabToolTip(2, "Your marks (kept until you remove them) and the ones Rewind made")
        self.tabs.currentChanged.connect(self._on_tab)

        # until the store is open (or when it failed): a message instead of empty charts
        self.message = QLabel("Opening...")
        self.message.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.message.setWordWrap(True)
        self.message.setObjectName("heroSubtitle")
        self.pages = QStackedWidget()
        self.pages.addWidget(self.message)
        self.pages.addWidget(self.tabs)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 10, 12, 6)
        lay.addLayout(head)
        lay.addWidget(self.info_bar)
        lay.addWidget(self.serve_row)
        lay.addWidget(self.pages, 1)
        self._set_enabled(False)

        self.refresh_timer = QTimer(self)
        self.refresh_timer.setInterval(1000)
        self.refresh_timer.timeout.connect(self._tick)
        self.throttle = QTimer(self)
        self.throttle.setSingleShot(True)
        self.throttle.setInterval(PREVIEW_THROTTLE_MS)
        self.throttle.timeout.connect(self._send_preview)

    def _connect(self) -> None:
        w = self.worker
        w.opened.connect(self._on_opened)
        w.snapshot.connect(self._on_snapshot)
        w.failed.connect(self._on_failed)
        w.previewReady.connect(self._on_preview)
        w.previewFailed.connect(self._on_preview_failed)
        w.fileReady.connect(self._on_file)
        w.confirmInfo.connect(self._on_confirm_info)
        w.marked.connect(lambda m: self.notify.emit("Mark added", f"{self.title}: {m.name}", "info"))
        w.jobStarted.connect(self._on_job_started)
        w.jobProgress.connect(self._on_job_progress)
        w.jobDone.connect(self._on_job_done)
        w.jobFailed.connect(self._on_job_failed)
        w.engineEvent.connect(self._on_engine_event)
        w.serveChanged.connect(self._on_serve_changed)
        w.writeFailed.connect(self._on_write_failed)
        self.timeline.timeRequested.connect(lambda t: self._want(("time", int(t))))
        self.timeline.seqRequested.connect(self._on_seq_requested)
        self.timeline.nowRequested.connect(lambda: self._want(("now", 0)))
        self.charts.markClicked.connect(lambda s: self.go_to_seq(int(s)))
        self.preview_pane.fileRequested.connect(lambda seq, path: w.read_file("show", seq, path, 1 << 20))
        self.preview_pane.saveRequested.connect(self._save_file)
        self.preview_pane.blockRequested.connect(lambda seq, b: w.read_block(int(seq), int(b)))
        # clicked(bool) would land in the optional argument: call with none
        self.mark_button.clicked.connect(lambda: self.mark_now())
        self.export_button.clicked.connect(lambda: self.export_point())
        self.rewind_button.clicked.connect(self.rewind_point)
        self.serve_button.toggled.connect(self._toggle_serve)
        self.verify_button.clicked.connect(self.verify)
        self.demo_button.clicked.connect(self._toggle_demo)
        self.retention_page.fadeRequested.connect(self.fade_now)
        self.retention_page.applyRequested.connect(self._apply_retention)
        w.fadePreview.connect(self._on_fade_preview)
        w.marksEdited.connect(self._on_marks_edited)
        mp = self.marks_page
        mp.goTo.connect(self._go_to_mark)
        mp.renameRequested.connect(self.rename_mark)
        mp.removeRequested.connect(self.remove_mark)
        mp.keepRequested.connect(lambda name: self.worker.edit_mark("keep", name))

    def _set_enabled(self, on: bool) -> None:
        remote = bool(self.snap and self.snap.remote)
        busy = self.worker.busy
        self.mark_button.setEnabled(on)
        self.export_button.setEnabled(on and not busy)
        self.rewind_button.setEnabled(on and not busy and not remote)
        self.rewind_button.setToolTip("A separate `rewind serve` holds this volume: stop it to rewind"
                                      if remote else "Make the volume equal to the timeline's point (undoable)")
        self.serve_button.setEnabled(on and not remote)
        self.verify_button.setEnabled(on and not busy)
        self.demo_button.setEnabled(on and not busy)
        self.retention_page.fade_button.setEnabled(on and not busy)
        self.retention_page.apply_button.setEnabled(on)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.stateChanged.emit(state)

    # -- worker answers --------------------------------------------------------------------------
    def _on_opened(self, snap: Snapshot) -> None:
        if self._opened:
            return
        self._opened = True
        if not self.demo:
            self.title = Path(snap.primary).name or self.title
        self.title_label.setText(self.title)
        self.titleChanged.emit(self.title)
        self.pages.setCurrentIndex(1)
        self._on_snapshot(snap)
        self._set_enabled(True)
        self.refresh_timer.start()
        self._want(("now", 0))
        self.timeline.setFocus()  # arrows and PgUp/PgDn work at once

    def _tick(self) -> None:
        if not self._refresh_pending:
            self._refresh_pending = True
            self.worker.refresh()

    def _on_snapshot(self, snap: Snapshot) -> None:
        self._refresh_pending = False
        self._refresh_failing = False
        first = self.snap is None
        if self.snap is not None and self.snap.remote and not snap.remote:
            QTimer.singleShot(0, self, lambda: self._set_enabled(True))  # taken over: Rewind and Serve again
        self.snap = snap
        self.charts.update_chart(snap.chart, snap.horizon_time / 1e9, snap.head_time / 1e9, snap.journal_xy)
        self.charts.set_marks(snap.marks)
        self.timeline.set_range(snap.horizon, snap.head, snap.horizon_time, max(snap.head_time, time.time_ns()))
        self.timeline.set_marks(snap.marks)
        self.marks_page.set_marks(snap.marks)
        if snap.chart is not None:
            c = snap.chart
            self.timeline.set_density(c.t + c.bucket_s / 2, c.writes, c.bucket_s)
        if self.timeline.at_now:
            self.charts.set_cursor(None)
        kind = "held by `rewind serve` (attached)" if snap.remote else "protected"
        self.subtitle.setText(f"{snap.primary}  ·  {human_bytes(snap.size)}  ·  {kind}  ·  "
                              f"{len(snap.marks)} marks  ·  block {snap.block_size} B")
        if self.demo:
            running = bool(snap.demo.get("running"))
            self.demo_button.setText("Pause demo" if running else "Resume demo")
            self.subtitle.setText(self.subtitle.text() + "\n" + demo_note(snap))
        self._set_state(self._state_text())
        self._check_space(snap)
        self._show_retention(snap)
        self.statusChanged.emit(snap)
        # keep the preview of "now" fresh while writes go on (rate-limited)
        if (self.timeline.at_now and snap.head != self._last_preview_head and not first
                and time.monotonic() - self._last_preview_at > FOLLOW_NOW_MS / 1000):
            self._want(("now", 0))
        if self.preview is not None and not self.timeline.at_now:
            self._update_point_label(self.preview.seq, self.preview.time_ns)
        elif self.preview is not None:
            self._update_point_label(snap.head, snap.head_time, at_now=True)  # keep up with the status bar

    # -- retention ------------------------------------------------------------------------------------
    def _on_tab(self, index: int) -> None:
        if index == 1:
            self.retention_page.request_preview()

    def show_retention(self) -> None:
        self.tabs.setCurrentIndex(1)

    def _show_retention(self, snap: Snapshot) -> None:
        """The retention page's facts, the tiers on the timeline, and history faded early."""
        self.retention_page.set_snapshot(snap)
        p = self.retention_page.preview
        policy = str(snap.retention.get("policy") or "")
        if policy:
            from rewind.engine.errors import BadInput
            from rewind.engine.retention import Policy

            from ..link import bands_for
            try:
                bands = bands_for(Policy.parse(policy), time.time_ns())
            except BadInput:
                bands = []
            hz = p.new_horizon_ns if p is not None and p.policy == policy else None
            self.timeline.set_retention(bands, hz)
        notes = [n for n in snap.retention.get("faded_early") or [] if isinstance(n, dict)]
        newer = [n for n in notes if int(n.get("time_ns", 0)) > self._faded_seen()]
        if newer:
            self._faded_early(newer, while_closed=not self._faded_checked)
        self._faded_checked = True

    def _faded_key(self) -> str:
        import hashlib

        link = self.worker.link
        where = str(link.dir) if link is not None else self.title
        return "fadedEarlySeen/" + hashlib.sha1(where.encode()).hexdigest()[:16]

    def _faded_seen(self) -> int:
        from PySide6.QtCore import QSettings

        if self._faded_seen_ns is None:
            v = QSettings("rewind", "console").value(self._faded_key(), 0)
            try:
                self._faded_seen_ns = int(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                self._faded_seen_ns = 0
        return self._faded_seen_ns

    def _faded_early(self, notes: list[dict[str, Any]], while_closed: bool = False) -> None:
        """History went early because the journal hit its space limit: say so, once per fade."""
        from PySide6.QtCore import QSettings

        last = max(int(n.get("time_ns", 0)) for n in notes)
        if last <= self._faded_seen():
            return
        self._faded_seen_ns = last
        QSettings("rewind", "console").setValue(self._faded_key(), str(last))
        limit = human_bytes(self.snap.max_size) if self.snap is not None and self.snap.max_size else "its"
        hz = int(notes[-1].get("horizon", 0))
        when = "While the console was closed, h" if while_closed else "H"
        times = f" {len(notes)} times" if len(notes) > 1 else ""
        text = (f"{when}istory of {self.title} was faded early{times}: the journal reached {limit} space limit, "
                f"so the oldest kept points went (the horizon is now record {hz:,}).")
        self.info_bar.show_message(text, "Retention...", self.show_retention)
        self.notify.emit("History faded early", text + " Raise the limit or shorten retention.", "warning")

    def fade_now(self) -> None:
        """Fade now: first work out what it removes (store.fade_preview) and ask."""
        if self.worker.busy or self.snap is None:
            return
        self.worker.fade_preview(None, "fade")

    def _apply_retention(self, policy: str, max_size: int, on_full: str) -> None:
        """A new policy that would fade history is applied only once the person has seen what goes."""
        self._pending_retention = (policy, max_size, on_full)
        if self.snap is not None and policy != str(self.snap.retention.get("policy") or ""):
            self.worker.fade_preview(policy, "apply")
        else:
            self.worker.apply_retention(policy, max_size, on_full)

    def _on_fade_preview(self, then: str, info: dict[str, Any]) -> None:
        from ..dialogs.fade import FadeConfirm

        pending = self._pending_retention
        if then == "apply" and pending is not None and not info.get("points") and not info.get("marks"):
            self.worker.apply_retention(*pending)  # nothing would go: nothing to ask
            return
        dlg = FadeConfirm(self, info, self.title, apply=then == "apply")
        self.fade_dialog = dlg

        def answered(button: Any) -> None:
            self.fade_dialog = None
            if button is not dlg.fade_button:
                if then == "apply":
                    self.retention_page.status_label.setText("Not applied: nothing changed")
                return
            if then == "apply" and pending is not None:
                self.worker.apply_retention(*pending)
            elif then == "fade":
                self._run_fade()

        dlg.buttonClicked.connect(answered)
        dlg.open()

    def _run_fade(self) -> None:
        """Run the policy now (store.fade()) as a job: progress, Cancel."""
        if self.worker.busy or self.snap is None:
            return
        self.job_dialog = JobDialog(self, "Fade now", f"Applying {self.title}'s retention now: merging points "
                                    "the policy no longer keeps and freeing their space...", unit="steps")
        self.job_dialog.cancelRequested.connect(self.worker.cancel_job)
        self.job_dialog.open()
        self.worker.fade()
        self._after_job_start()

    def _check_space(self, snap: Snapshot) -> None:
        """Warn once when the journal passes 90% of its space limit (again after it fell below 80%)."""
        if not snap.max_size or snap.journal_bytes < 0:
            return
        used = snap.journal_bytes / snap.max_size
        if used >= 0.9 and not self._space_warned:
            self._space_warned = True
            then = ("new writes will be refused" if snap.on_full == "refuse"
                    else "the oldest history will fade early to make room")
            self.notify.emit("Journal nearly full",
                             f"{self.title}: {used:.0%} of its {human_bytes(snap.max_size)} limit used; "
                             f"when full, {then}. Raise the limit or shorten retention.", "warning")
        elif used < 0.8:
            self._space_warned = False

    def _state_text(self) -> str:
        snap = self.snap
        if self.error is not None and snap is None:
            return "Failed to open"
        if self.worker.busy:
            return {"export": "Exporting...", "rewind": "Rewinding...", "verify": "Verifying...",
                    "fade": "Fading..."}.get(
                self.worker.job_kind, "Busy...")
        if snap is None:
            return "Opening..."
        if snap.remote:
            return "Protected by rewind serve"
        if snap.served:
            return f"Served ({snap.connections} client{'s' if snap.connections != 1 else ''})"
        if self.demo and snap.demo.get("running"):
            return "Protecting · demo paced" if snap.demo.get("paced") else "Protecting · demo running"
        return "Protecting"

    def _on_failed(self, what: str, e: BaseException) -> None:
        if what in ("open", "create", "demo") and self.snap is None:
            if self.error is e:
                return  # already reported (the catch-up and the signal both came)
        if what == "refresh":
            self._refresh_pending = False
            if self._refresh_failing:
                return  # said once already; the state in the list keeps saying it
            self._refresh_failing = True
            if self.snap is not None and self.snap.remote:
                # the socket's error says "in use by another process" even when nothing holds the
                # store any more: say what is known, and offer to open it here
                self.notify.emit("Protection stopped?", f"{self.title}: `rewind serve` no longer answers (it "
                                 "stopped, or is stuck): writes through it are no longer kept.", "critical")
                self.info_bar.show_message(
                    f"`rewind serve` no longer answers for {self.title}. If it has stopped, take the "
                    "volume over: the console opens its history itself (then Serve it to keep protecting).",
                    "Take over", self.take_over)
                self._set_state("Lost touch with serve")
                return
        if what in ("open", "create") or (what == "demo" and self.snap is None):
            # (a demo step failing later stops the workload only: the history stays on screen)
            self.error = e
            self._set_state("Failed to open")
            self.subtitle.setText("Could not open this protection.")
            self.message.setText(f"Could not open this protection.\n\n{e}\n\n"
                                 "It leaves the list when you close the message that says why.")
            self.pages.setCurrentIndex(0)
            self.refresh_timer.stop()
        if what == "demo" and self.snap is not None:
            self.notify.emit("Demo workload stopped", f"{e}", "warning")
        if what == "rewind-check":
            self._reset_rewind_button()
        if what == "serve":
            self.serve_button.blockSignals(True)
            self.serve_button.setChecked(False)
            self.serve_button.blockSignals(False)
        titles = {"open": "Cannot open the protection", "create": "Cannot protect this image",
                  "demo": "The demo stopped", "serve": "Cannot serve the volume", "mark": "Cannot add the mark",
                  "save-file": "Cannot save the file", "read-file": "Cannot read the file",
                  "rewind-check": "Cannot prepare the rewind", "take-over": "Cannot take the volume over",
                  "fade-preview": "Cannot work out what a fade would remove"}
        from rewind.engine.errors import BadInput

        todo = "Pick another name for the mark." if what == "mark" and isinstance(e, BadInput) else ""
        box = show_error(self, titles.get(what, "Something went wrong"), e, doing=what, todo=todo)
        if what in ("open", "create", "demo") and self.snap is None:
            box.finished.connect(lambda _r: self.openFailed.emit())  # no dead "Failed to open" entries
        if what in ("serve", "stop-serve", "demo"):
            self.notify.emit(titles.get(what, "Rewind"), str(e), "critical")

    # -- timeline -> preview ----------------------------------------------------------------------
    def _want(self, target: tuple[str, int]) -> None:
        """Rate-limit preview requests: the newest target is sent at most every PREVIEW_THROTTLE_MS."""
        self._pending_target = target
        if target[0] == "time":
            self._update_point_label(None, target[1])
        if not self.throttle.isActive():
            self._send_preview()
            self.throttle.start()

    def _send_preview(self) -> None:
        target, self._pending_target = self._pending_target, None
        if target is None or self.snap is None:
            return
        self.worker.request_preview(target)
        self._last_preview_at = time.monotonic()

    def _on_seq_requested(self, seq: Any) -> None:
        """A step from the point shown: in a stretch retention thinned, on to the next kept point."""
        shown = self.preview.seq if self.preview is not None else None
        kind = "seq" if shown is None or seq == shown else ("next" if seq > shown else "prev")
        self._want((kind, int(seq)))

    def go_to_seq(self, seq: int) -> None:
        """Move the timeline to a record (used by tests and the mark list)."""
        self.timeline.at_now = False
        self.timeline.seq = seq
        self._want(("seq", seq))

    def _on_preview(self, gen: int, p: Preview) -> None:
        if gen != self.worker.preview_gen:
            return  # stale: a newer request is on its way
        self.preview = p
        self._last_preview_head = p.head
        at_now = p.seq >= p.head and self.timeline.at_now
        self.timeline.set_point(p.seq, p.time_ns if not at_now else self.timeline.t_max)
        self.charts.set_cursor(None if at_now else p.time_ns / 1e9)
        self._update_point_label(p.seq, p.time_ns, at_now)
        self.preview_pane.show_preview(p)
        self.shown_gen = gen

    def _on_preview_failed(self, gen: int, e: BaseException) -> None:
        if gen != self.worker.preview_gen:
            return
        self.preview_pane.header.setText(f"Cannot read this point: {e}")
        from rewind.engine.errors import CorruptionError

        if isinstance(e, CorruptionError):
            show_error(self, "Damaged history", e, doing="reading a past point")
            self.notify.emit("Damaged history", f"{self.title}: {e}", "critical")

    def _update_point_label(self, seq: int | None, t_ns: int, at_now: bool = False) -> None:
        if at_now and seq is not None and self.snap is not None:
            seq = max(seq, self.snap.head)  # the newest record known, as in the status bar
        if at_now:
            self.point_label.setText(f"Now · record {seq:,}" if seq is not None else "Now")
            return
        parts = [human_time(t_ns, with_date=True)]
        if seq is not None:
            parts.append(f"record {seq:,}")
        near = self._nearest_mark(t_ns)
        if near is not None:
            m, dt = near
            if abs(dt) < 0.0005:
                parts.append(f"mark “{m.name}”")
            else:
                parts.append(f"{abs(dt):.1f} s {'after' if dt > 0 else 'before'} mark “{m.name}”")
        self.point_label.setText("  ·  ".join(parts))

    def _nearest_mark(self, t_ns: int) -> tuple[Any, float] | None:
        if self.snap is None or not self.snap.marks:
            return None
        m = min(self.snap.marks, key=lambda m: abs(m.time_ns - t_ns))
        return m, (t_ns - m.time_ns) / 1e9

    def point_seq(self) -> int | None:
        """The record the timeline shows (None before the first preview)."""
        if self.preview is None:
            return None
        return self.preview.seq

    # -- files -------------------------------------------------------------------------------------
    def _on_file(self, purpose: str, path: Any, data: Any) -> None:
        if purpose == "show":
            self.preview_pane.show_file(str(path), bytes(data))
        elif purpose == "block":
            self.preview_pane.show_block(int(path), bytes(data))
        elif purpose == "saved":
            self.notify.emit("File restored", f"{path} ({human_bytes(int(data))})", "info")
            self.info_bar.show_message(f"Restored {Path(str(path)).name} ({human_bytes(int(data))}) to {path}")

    def _save_file(self, seq: int, path: str) -> None:
        name = path.rsplit("/", 1)[-1]
        dest = files.save_path(self, "Save the file as it was", str(Path.home() / name))
        if dest:
            self.worker.save_file(seq, path, dest)

    # -- actions ---------------------------------------------------------------------------------
    def mark_now(self, name: str | None = None) -> None:
        if name is None:
            name = self._ask_mark_name()
            if not name:
                return
        self.worker.mark(name.strip())

    def _ask_mark_name(self) -> str:
        """Ask for a name until it is new: a taken name is asked again, saying so (the engine
        refuses it, and its refusal used to close the dialog with advice about picking files)."""
        taken = {m.name for m in self.snap.marks} if self.snap is not None else set()
        text = _dt.datetime.now().strftime("mark %H.%M.%S")
        label = "Name for this moment:"
        while True:
            dlg = QInputDialog(self)
            dlg.setObjectName("markNameDialog")
            dlg.setWindowTitle("Mark now")
            dlg.setLabelText(label)
            dlg.setTextValue(text)
            ok = dlg.exec() == QInputDialog.DialogCode.Accepted
            text = dlg.textValue().strip()
            dlg.deleteLater()
            if not ok or not text:
                return ""
            if text not in taken:
                return text
            label = f"A mark named “{text}” exists already: pick another name for this moment:"

    def export_point(self, out: str | None = None) -> None:
        seq = self.point_seq()
        if seq is None:
            return
        if out is None:
            stamp = _dt.datetime.fromtimestamp(self.preview.time_ns / 1e9).strftime("%Y%m%d-%H%M%S")  # type: ignore[union-attr]
            stem = Path(self.snap.primary).stem if self.snap else "volume"
            out = files.save_path(self, "Export this point as an image", str(Path.home() / f"{stem}-{stamp}.img"),
                                  "Raw disk images (*.img *.raw);;All files (*)")
            if not out:
                return
        self.export_path = out
        when = human_time(self.preview.time_ns, with_date=True) if self.preview else ""
        self.job_dialog = JobDialog(self, "Export", f"Exporting {self.title} as it was at {when} "
                                    f"(record {seq:,}) to {out}")
        self.job_dialog.cancelRequested.connect(self.worker.cancel_job)
        self.job_dialog.open()
        self.worker.export(seq, out)
        self._after_job_start()

    def rewind_point(self) -> None:
        seq = self.point_seq()
        if seq is None:
            return
        # working out what would change reads the history: say so while it runs
        self.rewind_button.setEnabled(False)
        self.info_bar.show_message(f"Working out what a rewind to record {seq:,} would change...")
        self.worker.confirm_rewind_info(seq)

    def _on_confirm_info(self, seq: int, info: dict[str, int]) -> None:
        self._reset_rewind_button()
        if self.preview is None or self.snap is None:
            return
        near = self._nearest_mark(self.preview.time_ns)
        mark = near[0].name if near and near[0].seq == seq else ""
        dlg = RewindConfirm(self, primary=Path(self.snap.primary).name, seq=seq,
                            time_ns=self.preview.time_ns,
                            mark=mark, blocks=info["blocks"], nbytes=info["bytes"], served=bool(self.snap.served),
                            remote=self.snap.remote, demo=self.demo and bool(self.snap.demo.get("running")))
        self.rewind_dialog = dlg
        dlg.accepted.connect(lambda: self._do_rewind(seq))
        dlg.open()

    def _reset_rewind_button(self) -> None:
        self.info_bar.hide()
        self._set_enabled(self.snap is not None)

    def _do_rewind(self, point: int | str, undo: bool = False) -> None:
        self.rewind_dialog = None
        self.job_dialog = JobDialog(self, "Undo rewind" if undo else "Rewind",
                                    "Undoing the rewind..." if undo else "Rewinding the volume...", unit="blocks")
        self.job_dialog.cancelRequested.connect(self.worker.cancel_job)
        self.job_dialog.open()
        self._undoing = undo
        self.worker.rewind(point)  # type: ignore[arg-type]
        self._after_job_start()

    def undo_rewind(self) -> None:
        if self._undo_mark:
            self.info_bar.hide()
            self._do_rewind(f"mark:{self._undo_mark}", undo=True)

    def _go_to_mark(self, seq: int) -> None:
        self.tabs.setCurrentIndex(0)
        self.go_to_seq(seq)

    def rename_mark(self, name: str) -> None:
        new, ok = QInputDialog.getText(self, "Rename the mark", f"New name for “{name}”:", text=name)
        new = new.strip() if ok else ""
        if new and new != name:
            self.worker.edit_mark("rename", name, new)

    def remove_mark(self, name: str) -> None:
        from ..dialogs.errors import ask

        m = self.marks_page.mark(name)
        then = ("its point then follows retention like any other, and may fade" if m is not None and m.pinned
                else "its point follows retention as before")
        if ask(self, "Remove the mark?", f"Remove the mark “{name}”?", f"The history is not changed; {then}.",
               ("Remove", "Cancel"), default=1) == 0:
            self.worker.edit_mark("remove", name)

    def _on_marks_edited(self, action: str, name: str) -> None:
        said = {"rename": "renamed", "remove": "removed", "keep": "kept until you remove it"}.get(action, action)
        self.info_bar.show_message(f"Mark “{name}” {said}.")

    def verify(self) -> None:
        self.job_dialog = JobDialog(self, "Verify", f"Checking every checksum of {self.title}'s history...")
        self.job_dialog.cancelRequested.connect(self.worker.cancel_job)
        self.job_dialog.open()
        self.worker.verify()
        self._after_job_start()

    def _after_job_start(self) -> None:
        self._set_enabled(True)
        self._set_state(self._state_text())

    def _toggle_serve(self, on: bool) -> None:
        if on:
            self.worker.start_serve()
        else:
            self.worker.stop_serve()

    def _on_serve_changed(self, uri: str) -> None:
        self.serve_row.setVisible(bool(uri))
        self.serve_uri.setText(uri)
        self.serve_button.blockSignals(True)
        self.serve_button.setChecked(bool(uri))
        self.serve_button.setText("Stop serving" if uri else "Serve")
        self.serve_button.blockSignals(False)
        self.worker.refresh()
        if uri:
            self.notify.emit("Serving", f"{self.title} at {uri}", "info")

    def _on_write_failed(self, op: str, e: BaseException) -> None:
        from ..dialogs.errors import explain

        now = time.monotonic()  # the engine's event and our NBD server may both report one failure
        if now - self._last_write_notice < 10:
            return
        self._last_write_notice = now
        what, todo = explain(e, doing=f"a {op}")
        self.notify.emit("A write failed", f"{self.title}: {what} {todo}", "critical")
        self.info_bar.show_message(f"A write to {self.title} failed: {what}")

    def _copy_uri(self) -> None:
        QApplication.clipboard().setText(self.serve_uri.text())
        self.copy_button.setText("Copied")
        QTimer.singleShot(1500, self.copy_button, lambda: self.copy_button.setText("Copy"))

    def _toggle_demo(self) -> None:
        if self.worker.demo_running:
            self.worker.stop_demo()
        else:
            self.worker.start_demo(interval=self.worker.demo.interval if self.worker.demo is not None else 0.15)
        QTimer.singleShot(200, self, self.worker.refresh)

    # -- jobs ----------------------------------------------------------------------------------------
    def _on_job_started(self, kind: str) -> None:
        self._set_state(self._state_text())

    def _on_job_progress(self, kind: str, ev: Any) -> None:
        if self.job_dialog is not None:
            self.job_dialog.progress(ev)
        self._set_state(f"{self._state_text()} {int(100 * ev.done / max(1, ev.total))}%")

    def _on_job_done(self, kind: str, result: Any) -> None:
        dlg = self.job_dialog
        self._set_enabled(True)
        if kind == "export":
            if dlg is not None:
                dlg.done_ok(f"Done: {self.export_path}")
            self.notify.emit("Export finished", self.export_path, "info")
        elif kind == "rewind":
            if dlg is not None:
                dlg.done_ok("Done.")
                dlg.accept()
            if getattr(self, "_undoing", False):
                self.info_bar.show_message("The rewind was undone: the volume is as it was before it.")
                self._undo_mark = ""
            else:
                self._undo_mark = str(result or "")
                self.info_bar.show_message(
                    f"Rewound {self.title}. The state before is kept as mark “{self._undo_mark}”.",
                    "Undo", self.undo_rewind)
            self.notify.emit("Rewind finished", f"{self.title}", "info")
            self.timeline.go_now()
        elif kind == "fade":
            r = result if isinstance(result, dict) else {}
            before, after = int(r.get("journal_before", 0)), int(r.get("journal_after", 0))
            text = (f"Done: the journal went from {human_bytes(before)} to {human_bytes(after)}; "
                    f"{int(r.get('points_dropped', 0)):,} points merged away or faded.")
            if dlg is not None:
                dlg.done_ok(text)
            self.info_bar.show_message(f"Fade: {text[6:]}")
            self.retention_page.request_preview()
        elif kind == "verify":
            problems = list(result or [])
            if problems:
                if dlg is not None:
                    dlg.done_failed(f"{len(problems)} problems found.")
                show_error(self, "Verify found damage",
                           f"{len(problems)} problem(s) in the history of {self.title}.",
                           details="\n".join(str(p) for p in problems[:200]),
                           todo="Rewind never serves damaged data: a read that needs a damaged record fails "
                                "and says where. The volume itself is unharmed. Export the points you need "
                                "while they still read, then protect the image again into a new folder. "
                                "Show Details lists every problem with its file and offset.")
                self.notify.emit("Verify found damage", f"{self.title}: {len(problems)} problems", "critical")
            else:
                if dlg is not None:
                    dlg.done_ok("No problems found: every record and map checks out.")
                self.info_bar.show_message(f"Verify: no problems found in {self.title}'s history.")
        self.worker.refresh()
        self._set_state(self._state_text())

    def _on_job_failed(self, kind: str, e: BaseException) -> None:
        dlg = self.job_dialog
        self._set_enabled(True)
        if isinstance(e, Cancelled):
            if dlg is not None:
                dlg.done_cancelled("Cancelled. Nothing was left half-written." if kind == "export"
                                   else "Cancelled.")
        else:
            if dlg is not None:
                dlg.done_failed(f"Failed: {e}")
            show_error(self, f"{kind.capitalize()} failed", e, doing=kind)
            self.notify.emit(f"{kind.capitalize()} failed", f"{self.title}: {e}", "critical")
        self.worker.refresh()
        self._set_state(self._state_text())

    def _on_engine_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind in ("error", "write-error", "stopped"):
            self.notify.emit("Protection problem", f"{self.title}: {data.get('message', kind)}", "critical")
        elif kind == "damage":
            self.notify.emit("Damage found", f"{self.title}: {len(data.get('problems', []))} problems", "critical")
        elif kind == "write-failed":
            from rewind.engine.control import error_from_json

            err = error_from_json({"ok": False, "exit_code": 1, "error": str(data.get("kind", "")),
                                   "message": str(data.get("message", "a write failed"))})
            self._on_write_failed("write", err)
        elif kind == "faded-early":
            self._faded_early([data])
        elif kind == "space-held":
            self.notify.emit("History space", f"{self.title}: {data.get('message', kind)}", "warning")
        elif kind in ("near-full", "journal-full"):
            msg = data.get("message") or data.get("note") or ", ".join(f"{k} {v}" for k, v in data.items())
            self.notify.emit("Journal space", f"{self.title}: the journal reached its limit; "
                             f"the oldest history faded early ({msg})", "warning")
        if kind in ("mark", "rewind", "fade"):
            self.worker.refresh()

    def take_over(self) -> None:
        """The `rewind serve` this view was attached to stopped: open the store here instead."""
        self.info_bar.hide()
        self.worker.take_over()

    def show_message(self, text: str) -> None:
        show_info(self, "Rewind", text)


def demo_note(snap: Snapshot) -> str:
    """The demo's status in words: why its history outgrows its disk, and that it slows down on
    purpose (a demo at ~0.2 MB/s with no word looks stalled)."""
    why = (f"Every write is kept, so the history grows past the {human_bytes(snap.size)} disk's size: "
           "the same files are rewritten again and again, and each version stays.")
    if not snap.demo.get("running"):
        return f"Demo paused. {why}"
    if snap.demo.get("paced"):
        return f"Demo: paced to keep history small (a change every few seconds). {why}"
    minutes = float(snap.demo.get("busy_s", 120)) / 60
    return f"Demo: busy for its first {minutes:g} minutes, then paced to keep history small. {why}"
