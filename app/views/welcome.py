"""First start: three ways in (protect an image, open a protection, try the demo) and the
protections opened before."""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtWidgets import (
    QCommandLinkButton,
    QFrame,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..assets import app_icon


class WelcomeView(QWidget):
    protectRequested = Signal()
    openRequested = Signal()
    demoRequested = Signal()
    recentRequested = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        icon = QLabel()
        icon.setPixmap(app_icon().pixmap(QSize(96, 96)))
        icon.setAlignment(Qt.AlignmentFlag.AlignCenter)
        title = QLabel("Rewind")
        title.setObjectName("heroTitle")
        title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        subtitle = QLabel("Every write to your disk images kept. Drag the timeline to any moment,\n"
                          "see the files as they were, and export or rewind with a click.")
        subtitle.setObjectName("heroSubtitle")
        subtitle.setAlignment(Qt.AlignmentFlag.AlignCenter)

        self.protect_button = QCommandLinkButton(
            "Protect a disk image...",
            "Pick a raw image file or a block device, and where its history is kept. No copy is made.")
        self.open_button = QCommandLinkButton(
            "Open a protection...", "Open the history folder of an image protected before (also while "
            "`rewind serve` runs it).")
        self.demo_button = QCommandLinkButton(
            "Try the demo", "A small disk with a FAT filesystem and a workload that keeps changing its files. "
            "Needs no root; nothing outside Rewind's own folder is touched.")
        self.protect_button.clicked.connect(self.protectRequested)
        self.open_button.clicked.connect(self.openRequested)
        self.demo_button.clicked.connect(self.demoRequested)

        card = QFrame()
        card.setObjectName("card")
        cl = QVBoxLayout(card)
        cl.setContentsMargins(18, 14, 18, 14)
        for b in (self.protect_button, self.open_button, self.demo_button):
            b.setMinimumHeight(64)
            cl.addWidget(b)

        self.recent_label = QLabel("Opened before")
        self.recent_label.setObjectName("muted")
        self.recent = QListWidget()
        self.recent.setMaximumHeight(120)
        self.recent.itemActivated.connect(lambda it: self.recentRequested.emit(it.data(Qt.ItemDataRole.UserRole)))

        col = QVBoxLayout()
        col.addStretch(2)
        col.addWidget(icon)
        col.addWidget(title)
        col.addWidget(subtitle)
        col.addSpacing(18)
        col.addWidget(card)
        col.addSpacing(10)
        col.addWidget(self.recent_label)
        col.addWidget(self.recent)
        col.addStretch(3)
        outer = QHBoxLayout(self)
        outer.addStretch(1)
        inner = QWidget()
        inner.setLayout(col)
        inner.setMaximumWidth(620)
        inner.setMinimumWidth(440)
        outer.addWidget(inner, 4)
        outer.addStretch(1)
        self.set_recent([])

    def set_recent(self, dirs: list[str]) -> None:
        self.recent.clear()
        for d in dirs:
            it = QListWidgetItem(d)
            it.setData(Qt.ItemDataRole.UserRole, d)
            it.setToolTip("Double-click to open")
            self.recent.addItem(it)
        self.recent.setVisible(bool(dirs))
        self.recent_label.setVisible(bool(dirs))
