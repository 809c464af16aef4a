"""The retention page of one volume: the policy's tiers as editable rows, the journal's space
limit and what happens when it is reached, Apply (checked by the engine; a refusal is shown
inline in one line) and Fade now; and a preview of what the policy keeps of the present history:
points per tier, and on a timeline which stretches stay at full detail, hourly, daily, and where
the horizon will move."""

from __future__ import annotations

import time
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from rewind.engine.errors import BadInput
from rewind.engine.retention import DEFAULT_POLICY, Policy, format_duration, parse_duration

from ..format import human_bytes, human_time
from ..link import RetentionPreview, bands_for, step_words
from ..theme import colors
from .timeline import Timeline

PREVIEW_DELAY_MS = 250
PREVIEW_EVERY_MS = 15000  # the tiers slide with the clock: refresh the preview now and then
_WORDS = {"every write": "all", "all": "all", "every minute": "1m", "hourly": "1h", "daily": "1d", "weekly": "1w"}


def keep_to_step(text: str) -> str:
    """What the Keep cell says -> the policy's STEP ('all' or a duration): 'hourly' -> '1h',
    'one per 10m' -> '10m', '1d' -> '1d'. BadInput when it is neither."""
    t = " ".join(text.strip().lower().split())
    if t in _WORDS:
        return _WORDS[t]
    for prefix in ("one per ", "1 per ", "every "):
        if t.startswith(prefix):
            t = t[len(prefix):]
    parse_duration(t)  # BadInput with the engine's wording
    return t


def parse_size_text(text: str) -> int:
    """'20G' -> bytes, with the CLI's rules (binary units)."""
    from rewind.engine.cli import parse_size

    return parse_size(text.strip())


class RetentionPage(QWidget):
    """Edits one store's retention through its VolumeWorker; `fadeRequested` asks the volume
    view to run Fade now (as a job with its progress dialog)."""

    fadeRequested = Signal()
    applyRequested = Signal(str, int, str)  # policy, max_size (0: none), on_full: the view asks first
    openTimeline = Signal()

    def __init__(self, worker: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.worker = worker
        self.settings: dict[str, Any] = {}
        self.dirty = False
        self.preview: RetentionPreview | None = None
        self._gen = 0
        self._loading = False
        self._span = (0, 1)
        self._marks: list[Any] = []
        self._build()
        worker.retentionPreview.connect(self._on_preview)
        worker.retentionApplied.connect(self._on_applied)
        worker.retentionFailed.connect(self.show_error)

    # -- layout -----------------------------------------------------------------------------------
    def _build(self) -> None:
        intro = QLabel("Rewind keeps every write while it is young and thins out older history, so the "
                       "journal stays bounded. Each row keeps history younger than its age: every write, or "
                       "the newest point of each step (hourly, daily...). Older history fades into the "
                       "horizon. Your marks are kept until you remove them.")
        intro.setWordWrap(True)
        intro.setObjectName("muted")

        self.table = QTableWidget(0, 2)
        self.table.setObjectName("retentionTiers")
        self.table.setHorizontalHeaderLabels(["Keep history younger than", "Keep"])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setToolTip("Age: a number and s, m, h, d or w (24h, 7d). Keep: every write, hourly, daily, "
                              "weekly, or one per DURATION (one per 6h).")
        self.table.itemChanged.connect(self._edited)
        self.table.setMinimumHeight(110)
        self.table.setMaximumHeight(170)
        self.add_button = QPushButton("Add tier")
        self.add_button.clicked.connect(self.add_tier)
        self.remove_button = QPushButton("Remove tier")
        self.remove_button.clicked.connect(self.remove_tier)
        self.default_button = QPushButton("Default")
        self.default_button.setToolTip(f"Every write for a day, hourly for a week, daily for a month ({DEFAULT_POLICY})")
        self.default_button.clicked.connect(lambda: self.set_policy(DEFAULT_POLICY, edited=True))
        self.policy_text = QLabel("")
        self.policy_text.setObjectName("muted")
        self.policy_text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        tier_buttons = QHBoxLayout()
        for b in (self.add_button, self.remove_button, self.default_button):
            tier_buttons.addWidget(b)
        tier_buttons.addStretch(1)
        tier_buttons.addWidget(self.policy_text)

        self.limit_check = QCheckBox("Limit the journal to")
        self.limit_check.toggled.connect(self._edited)
        self.limit_edit = QLineEdit("")
        self.limit_edit.setPlaceholderText("e.g. 20G")
        self.limit_edit.setMaximumWidth(120)
        self.limit_edit.textEdited.connect(lambda _t: (self.limit_check.setChecked(True), self._edited()))
        self.fade_radio = QRadioButton("fade the oldest history early to make room (default)")
        self.refuse_radio = QRadioButton("refuse new writes (clients get ENOSPC; the volume's data is never lost)")
        self.full_group = QButtonGroup(self)
        self.full_group.addButton(self.fade_radio)
        self.full_group.addButton(self.refuse_radio)
        self.fade_radio.setChecked(True)
        self.fade_radio.toggled.connect(self._edited)
        space = QGridLayout()
        space.addWidget(self.limit_check, 0, 0)
        space.addWidget(self.limit_edit, 0, 1)
        self.journal_label = QLabel("")
        self.journal_label.setObjectName("muted")
        space.addWidget(self.journal_label, 0, 2)
        space.setColumnStretch(2, 1)
        space.addWidget(QLabel("When full:"), 1, 0, Qt.AlignmentFlag.AlignTop)
        radios = QVBoxLayout()
        radios.addWidget(self.fade_radio)
        radios.addWidget(self.refuse_radio)
        space.addLayout(radios, 1, 1, 1, 2)

        self.error_label = QLabel("")
        self.error_label.setObjectName("retentionError")
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet(f"color: {colors().deleted}; font-weight: 600;")
        self.error_label.hide()
        self.status_label = QLabel("")
        self.status_label.setObjectName("muted")
        self.apply_button = QPushButton("Apply")
        self.apply_button.setDefault(True)
        self.apply_button.clicked.connect(self.apply)
        self.revert_button = QPushButton("Revert")
        self.revert_button.clicked.connect(lambda: self.load(self.settings, force=True))
        self.fade_button = QPushButton("Fade now")
        self.fade_button.setToolTip("Apply the saved policy now: merge, fade and free space (can be cancelled)")
        self.fade_button.clicked.connect(self.fadeRequested.emit)
        actions = QHBoxLayout()
        actions.addWidget(self.apply_button)
        actions.addWidget(self.revert_button)
        actions.addWidget(self.status_label, 1)
        actions.addWidget(self.fade_button)

        self.timeline = Timeline()
        self.timeline.interactive = False
        self.timeline.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.timeline.setAccessibleName("What the policy keeps")
        self.summary = QLabel("Working out what the policy keeps...")
        self.summary.setObjectName("retentionSummary")
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.RichText)
        self.faded_label = QLabel("")
        self.faded_label.setWordWrap(True)
        self.faded_label.setObjectName("muted")
        self.faded_label.hide()

        preview = QFrame()
        preview.setObjectName("retentionPreview")
        pv = QVBoxLayout(preview)
        pv.setContentsMargins(0, 6, 0, 0)
        head = QLabel("<b>What will be kept</b> (of the history as it is now)")
        pv.addWidget(head)
        pv.addWidget(self.timeline)
        pv.addWidget(self.summary)
        pv.addWidget(self.faded_label)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 8, 4, 4)
        lay.addWidget(intro)
        lay.addWidget(self.table)
        lay.addLayout(tier_buttons)
        lay.addLayout(space)
        lay.addWidget(self.error_label)
        lay.addLayout(actions)
        lay.addWidget(preview)
        lay.addStretch(1)

        self.preview_timer = QTimer(self)
        self.preview_timer.setSingleShot(True)
        self.preview_timer.setInterval(PREVIEW_DELAY_MS)
        self.preview_timer.timeout.connect(self.request_preview)
        self.slide_timer = QTimer(self)
        self.slide_timer.setInterval(PREVIEW_EVERY_MS)
        self.slide_timer.timeout.connect(lambda: self.request_preview() if self.isVisible() else None)
        self.slide_timer.start()

    # -- the rows -----------------------------------------------------------------------------------
    def set_policy(self, text: str, edited: bool = False) -> None:
        """Show a policy's tiers as rows."""
        was, self._loading = self._loading, True
        try:
            policy = Policy.parse(text)
            self.table.setRowCount(0)
            for tier in policy.tiers:
                self._append_row(format_duration(tier.age), step_words(tier.step))
        finally:
            self._loading = was
        if edited:
            self._edited()
        else:
            self._update_policy_text()

    def _append_row(self, age: str, keep: str) -> None:
        r = self.table.rowCount()
        self.table.insertRow(r)
        self.table.setItem(r, 0, QTableWidgetItem(age))
        self.table.setItem(r, 1, QTableWidgetItem(keep))

    def add_tier(self) -> None:
        """A new oldest tier: twice the age of the last, one point per day (or per its age / 4)."""
        try:
            last = Policy.parse(self.policy_string()).tiers[-1]
            age, step = last.age * 4, max(last.step, 86400 * 10**9)
            self._append_row(format_duration(age), step_words(min(step, age)))
        except BadInput:
            self._append_row("", "daily")
        self._edited()

    def remove_tier(self) -> None:
        rows = sorted({i.row() for i in self.table.selectedIndexes()}) or [self.table.rowCount() - 1]
        if self.table.rowCount() - len(rows) < 1:
            self.show_error("keep at least one tier: history younger than its age is kept")
            return
        for r in reversed(rows):
            self.table.removeRow(r)
        self._edited()

    def set_row(self, row: int, age: str | None = None, keep: str | None = None) -> None:
        """Edit a cell as a user would (tests, keyboard-free)."""
        if age is not None:
            self.table.item(row, 0).setText(age)
        if keep is not None:
            self.table.item(row, 1).setText(keep)

    def policy_string(self) -> str:
        """The rows as the engine's policy text; BadInput naming the row that is wrong."""
        parts = []
        for r in range(self.table.rowCount()):
            age_item, keep_item = self.table.item(r, 0), self.table.item(r, 1)
            age = (age_item.text() if age_item else "").strip()
            keep = (keep_item.text() if keep_item else "").strip()
            try:
                parse_duration(age)
                step = keep_to_step(keep)
            except BadInput as e:
                raise BadInput(f"row {r + 1}: {e}") from None
            parts.append(f"{age}:{step}")
        if not parts:
            raise BadInput("add at least one tier")
        return ",".join(parts)

    def _update_policy_text(self) -> str | None:
        try:
            text = str(Policy.parse(self.policy_string()))
        except BadInput as e:
            self.policy_text.setText("")
            self.show_error(str(e))
            return None
        self.policy_text.setText(text)
        self.error_label.hide()
        return text

    def _edited(self, *_: Any) -> None:
        if self._loading:
            return
        self.dirty = True
        self.status_label.setText("Not applied yet")
        self._update_policy_text()
        self.preview_timer.start()

    # -- settings in and out ------------------------------------------------------------------------
    def load(self, settings: dict[str, Any], force: bool = False) -> None:
        """Show the store's settings (not over unsaved edits unless `force`)."""
        if not settings or (self.dirty and not force):
            self.settings = dict(settings) if settings else self.settings
            self._show_faded(settings)
            return
        self.settings = dict(settings)
        self._loading = True
        try:
            self.set_policy(str(settings.get("policy") or DEFAULT_POLICY))
            limit = settings.get("max_size")
            self.limit_check.setChecked(bool(limit))
            self.limit_edit.setText(_size_text(int(limit)) if limit else "")
            (self.refuse_radio if settings.get("on_full") == "refuse" else self.fade_radio).setChecked(True)
        finally:
            self._loading = False
        self.dirty = False
        self.error_label.hide()
        self.status_label.setText("")
        self._update_policy_text()
        self._show_faded(settings)
        self.request_preview()

    def _show_faded(self, settings: dict[str, Any]) -> None:
        notes = list(settings.get("faded_early") or [])
        if not notes:
            self.faded_label.hide()
            return
        last = notes[-1]
        when = human_time(int(last.get("time_ns", 0)), with_date=True) if last.get("time_ns") else "recently"
        self.faded_label.setText(f"History was faded early {len(notes)} time(s) because the journal reached its "
                                 f"space limit; the last time at {when} (horizon moved to record "
                                 f"{int(last.get('horizon', 0)):,}). Raise the limit or shorten the tiers.")
        self.faded_label.show()

    def apply(self) -> None:
        """Check locally (Policy.parse, size), then store.set_retention in the worker thread."""
        try:
            policy = str(Policy.parse(self.policy_string()))
            if self.limit_check.isChecked():
                max_size = parse_size_text(self.limit_edit.text())
                if max_size <= 0:
                    raise BadInput("the space limit must be positive (untick it for no limit)")
            else:
                max_size = 0
        except BadInput as e:
            self.show_error(str(e))
            return
        on_full = "refuse" if self.refuse_radio.isChecked() else "fade"
        self.error_label.hide()
        self.status_label.setText("Applying...")
        self.applyRequested.emit(policy, max_size, on_full)

    def show_error(self, text: str) -> None:
        self.error_label.setText(" ".join(str(text).split()))
        self.error_label.show()
        self.status_label.setText("")

    def _on_applied(self, settings: dict[str, Any]) -> None:
        self.dirty = False
        self.load(settings, force=True)
        self.status_label.setText("Applied: serve and Fade now use it from now on")

    # -- preview ------------------------------------------------------------------------------------
    def request_preview(self) -> None:
        try:
            text = str(Policy.parse(self.policy_string()))
        except BadInput as e:
            self.summary.setText(f"Fix the tiers to see what they keep: {e}")
            return
        self._gen = self.worker.preview_retention(text)

    def _on_preview(self, gen: int, p: Any) -> None:
        if gen != self._gen:
            return
        if isinstance(p, BaseException):
            self.summary.setText(f"Cannot work out what the policy keeps: {p}")
            return
        self.preview = p
        self.timeline.set_retention(p.bands, p.new_horizon_ns)
        lo = p.horizon_ns
        self._span = (lo, max(p.now_ns, lo + 1))
        self.timeline.set_range(0, 0, *self._span)
        rows = []
        prev = "now"
        for b in p.bands:
            age = format_duration(max(1, p.now_ns - b.lo_ns) // 10**9 * 10**9)
            rows.append(f"<tr><td>{prev} – {age}&nbsp;&nbsp;</td><td>{b.label}&nbsp;&nbsp;</td>"
                        f"<td align='right'><b>{b.points:,}</b> point{'s' if b.points != 1 else ''}</td></tr>")
            prev = age
        if p.new_horizon_ns is not None:
            fade = (f"Older than {prev}: {p.fading:,} write{'s' if p.fading != 1 else ''} fade; the horizon "
                    f"moves from {human_time(p.horizon_ns, with_date=True)} to "
                    f"{human_time(p.new_horizon_ns, with_date=True)}.")
        else:
            fade = f"Nothing is older than {prev} yet: the horizon stays at {human_time(p.horizon_ns, with_date=True)}."
        pins = (f" Your marks are kept until you remove them, whatever the tiers say: {', '.join(p.pinned)}."
                if p.pinned else "")
        gone = (f" Marks Rewind made that go with their points: {', '.join(p.marks_fading)}."
                if p.marks_fading else "")
        self.summary.setText(f"<table>{''.join(rows)}</table>{fade}{pins}{gone}")
        self.timeline.set_marks(self._kept_marks(self._marks))

    def _kept_marks(self, marks: list[Any]) -> list[Any]:
        """The marks "what will be kept" draws: not those the policy's fade removes."""
        going = set(self.preview.marks_fading) if self.preview is not None else set()
        return [m for m in marks if m.name not in going]

    # -- from the volume view -----------------------------------------------------------------------
    def set_snapshot(self, snap: Any) -> None:
        """Facts that change as writes go on: journal size, the timeline's span and marks."""
        if snap.retention and (not self.settings or not self.dirty):
            if snap.retention != self.settings:
                changed = snap.retention.get("policy") != self.settings.get("policy")
                self.load(snap.retention)
                if changed:
                    self.request_preview()
        limit = f" of its {human_bytes(snap.max_size)} limit" if snap.max_size else ""
        self.journal_label.setText(f"The journal holds {human_bytes(max(0, snap.journal_bytes))}{limit} now.")
        now = time.time_ns()
        self._span = (snap.horizon_time, max(now, snap.horizon_time + 1))
        self.timeline.set_range(0, 0, *self._span)
        self._marks = list(snap.marks)
        self.timeline.set_marks(self._kept_marks(self._marks))
        if self.preview is None and snap.retention:
            try:
                self.timeline.set_retention(bands_for(Policy.parse(str(snap.retention.get("policy"))), now))
            except BadInput:
                pass


def _size_text(n: int) -> str:
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
