"""The marks of one protection as a list: go to one, rename it, remove it, keep one the program
made. A person's marks (Mark now, `rewind mark`) are kept until that person removes them; the
program's (before a rewind, the demo's) follow retention, and the list says which is which."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..format import human_time

KEPT = "Kept until you remove it"
FOLLOWS = "Made by Rewind: goes when retention fades its point"


class MarksPage(QWidget):
    """Asks the volume view to act on the selected mark (the view owns the questions)."""

    goTo = Signal(int)  # seq
    renameRequested = Signal(str)
    removeRequested = Signal(str)
    keepRequested = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.marks: list[Any] = []
        intro = QLabel("Marks you make are kept until you remove them, whatever retention says. Marks Rewind "
                       "makes (before each rewind, the demo's) follow retention: Keep makes one yours.")
        intro.setWordWrap(True)
        intro.setObjectName("muted")
        self.table = QTableWidget(0, 4)
        self.table.setObjectName("marksList")
        self.table.setHorizontalHeaderLabels(["Mark", "When", "Record", "Kept"])
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for c in (1, 2):
            hh.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        hh.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.table.cellDoubleClicked.connect(lambda _r, _c: self._go())
        self.go_button = QPushButton("Go to")
        self.go_button.setToolTip("Show the volume as it was at this mark (the History tab)")
        self.go_button.clicked.connect(lambda: self._go())
        self.rename_button = QPushButton("Rename...")
        self.rename_button.clicked.connect(lambda: self._emit(self.renameRequested))
        self.remove_button = QPushButton("Remove...")
        self.remove_button.setToolTip("Remove the mark; its point then follows retention like any other")
        self.remove_button.clicked.connect(lambda: self._emit(self.removeRequested))
        self.keep_button = QPushButton("Keep until removed")
        self.keep_button.setToolTip("Make a mark Rewind made yours: retention no longer fades its point")
        self.keep_button.clicked.connect(lambda: self._emit(self.keepRequested))
        buttons = QHBoxLayout()
        for b in (self.go_button, self.rename_button, self.remove_button, self.keep_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 8, 4, 4)
        lay.addWidget(intro)
        lay.addWidget(self.table, 1)
        lay.addLayout(buttons)
        self._update_buttons()

    def set_marks(self, marks: list[Any]) -> None:
        """Show `marks` (newest first), keeping the selection by name."""
        key = [(m.name, m.seq, bool(m.pinned)) for m in marks]
        if key == [(m.name, m.seq, bool(m.pinned)) for m in self.marks]:
            return
        chosen = self.selected()
        self.marks = list(marks)
        self.table.setRowCount(0)
        for m in sorted(marks, key=lambda m: m.seq, reverse=True):
            r = self.table.rowCount()
            self.table.insertRow(r)
            name = QTableWidgetItem(m.name)
            name.setData(Qt.ItemDataRole.UserRole, m.name)
            self.table.setItem(r, 0, name)
            self.table.setItem(r, 1, QTableWidgetItem(human_time(int(m.time_ns), with_date=True)))
            rec = QTableWidgetItem(f"{int(m.seq):,}")
            rec.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.table.setItem(r, 2, rec)
            self.table.setItem(r, 3, QTableWidgetItem(KEPT if m.pinned else FOLLOWS))
            if chosen == m.name:
                self.table.selectRow(r)
        self._update_buttons()

    def select(self, name: str) -> None:
        for r in range(self.table.rowCount()):
            if self.table.item(r, 0).data(Qt.ItemDataRole.UserRole) == name:
                self.table.selectRow(r)
                return

    def selected(self) -> str | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        return str(self.table.item(rows[0].row(), 0).data(Qt.ItemDataRole.UserRole))

    def mark(self, name: str | None) -> Any:
        return next((m for m in self.marks if m.name == name), None)

    def _update_buttons(self) -> None:
        m = self.mark(self.selected())
        for b in (self.go_button, self.rename_button, self.remove_button):
            b.setEnabled(m is not None)
        self.keep_button.setEnabled(m is not None and not m.pinned)

    def _go(self) -> None:
        m = self.mark(self.selected())
        if m is not None:
            self.goTo.emit(int(m.seq))

    def _emit(self, signal: Any) -> None:
        name = self.selected()
        if name is not None:
            signal.emit(name)
