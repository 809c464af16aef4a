"""Dialogs around jobs: the progress of an export (speed, time left, Cancel that leaves nothing
half-written) or a verify, and the confirmation before a rewind that says what will change."""

from __future__ import annotations

import time
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..format import human_bytes, human_duration, human_time


class JobDialog(QDialog):
    """Progress of one job; Cancel asks the job to stop (it cleans up), then the dialog says so."""

    cancelRequested = Signal()

    def __init__(self, parent: QWidget | None, title: str, what: str, unit: str = "bytes") -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        self.setObjectName("jobDialog")
        self.setMinimumWidth(460)
        self.unit = unit
        self.started = time.monotonic()
        self.what = QLabel(what)
        self.what.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.detail = QLabel("Starting...")
        self.detail.setObjectName("muted")
        self.detail.setWordWrap(True)  # a result line (a fade's) can be longer than the dialog is wide
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self._cancel)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.accept)
        self.close_button.hide()
        lay = QVBoxLayout(self)
        lay.addWidget(self.what)
        lay.addWidget(self.bar)
        lay.addWidget(self.detail)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.cancel_button)
        row.addWidget(self.close_button)
        lay.addLayout(row)
        self.finished_state = ""

    def open(self) -> None:
        """Shown without modality: QDialog.open() would block the main window for the whole job,
        so its close button, Ctrl+Q and the other protections did nothing until the job ended."""
        self.setWindowModality(Qt.WindowModality.NonModal)
        self.show()
        self.raise_()

    def _fmt(self, n: float) -> str:
        return human_bytes(n) if self.unit == "bytes" else f"{n:,.0f} {self.unit}"

    def progress(self, ev: Any) -> None:
        total = max(1, int(ev.total))
        self.bar.setValue(int(1000 * min(1.0, ev.done / total)))
        rate = float(ev.rate or 0.0)
        left = (total - ev.done) / rate if rate > 0 else 0
        speed = f"{human_bytes(rate)}/s" if self.unit == "bytes" else f"{rate:,.0f} {self.unit}/s"
        eta = "less than a second left" if left < 1 else f"about {human_duration(left)} left"
        if rate <= 0:
            eta = "estimating time left"
        self.detail.setText(f"{self._fmt(ev.done)} of {self._fmt(total)}  ·  {speed}  ·  {eta}")

    def _cancel(self) -> None:
        self.cancel_button.setEnabled(False)
        self.detail.setText("Cancelling: removing what was written...")
        self.cancelRequested.emit()

    def done_ok(self, text: str) -> None:
        self.finished_state = "done"
        self.bar.setValue(1000)
        self.detail.setText(text)
        self._end()

    def done_cancelled(self, text: str) -> None:
        self.finished_state = "cancelled"
        self.detail.setText(text)
        self._end()

    def done_failed(self, text: str) -> None:
        self.finished_state = "failed"
        self.detail.setText(text)
        self._end()

    def _end(self) -> None:
        self.cancel_button.hide()
        self.close_button.show()
        self.close_button.setDefault(True)

    def reject(self) -> None:
        """Escape / the window's close button: cancel while running, close when finished."""
        if not self.finished_state:
            self._cancel()
            return
        super().reject()


class RewindConfirm(QDialog):
    """Says what a rewind will change before it does anything."""

    def __init__(self, parent: QWidget | None, *, primary: str, seq: int, time_ns: int, mark: str,
                 blocks: int, nbytes: int, served: bool, remote: bool, demo: bool) -> None:
        super().__init__(parent)
        self.setWindowTitle("Rewind to this point?")
        self.setObjectName("rewindConfirm")
        self.setMinimumWidth(520)
        lay = QVBoxLayout(self)
        title = QLabel(f"<b>Rewind {primary} to {human_time(time_ns, with_date=True)}?</b>")
        title.setWordWrap(True)
        lay.addWidget(title)
        where = f"record {seq:,}" + (f", mark “{mark}”" if mark else "")
        if blocks == 0:
            change = "The volume already equals this point: nothing will change."
        else:
            change = (f"{blocks:,} blocks ({human_bytes(nbytes)}) of the volume will be written back to "
                      f"how they were at {where}.")
        lines = [change,
                 "The present is marked first (“before-rewind-N”), and everything written since stays in "
                 "the history: you can undo this rewind with one click."]
        if served:
            lines.append("<b>The volume is being served.</b> Programs using it (a VM, a mounted filesystem) "
                         "should be stopped first, or they will see their disk change under them.")
        if demo:
            lines.append("The demo workload pauses during the rewind and resumes afterwards.")
        if remote:
            lines.append("This volume is held by a separate `rewind serve`: stop it first to rewind.")
        self.body = QLabel("<br><br>".join(lines))
        self.body.setWordWrap(True)
        self.body.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self.body)
        self.buttons = QDialogButtonBox()
        self.rewind_button = self.buttons.addButton("Rewind", QDialogButtonBox.ButtonRole.AcceptRole)
        self.buttons.addButton(QDialogButtonBox.StandardButton.Cancel)
        self.rewind_button.setEnabled(blocks > 0 and not remote)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        lay.addWidget(self.buttons)
