"""Protect a disk image: pick the image (or a block device) and where its history goes
(by default under the user's data directory)."""

from __future__ import annotations

import re
from pathlib import Path

from platformdirs import user_data_dir
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import files


def default_store_dir(primary: str) -> Path:
    """<data dir>/rewind/protections/<image name>[-N]: a fresh folder for the history."""
    base = Path(user_data_dir("rewind")) / "protections"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(primary).name or "volume").strip("-") or "volume"
    d = base / stem
    n = 2
    while d.exists():
        d = base / f"{stem}-{n}"
        n += 1
    return d


class ProtectDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Protect a disk image")
        self.setMinimumWidth(560)
        self.image = QLineEdit()
        self.image.setPlaceholderText("/path/to/disk.img or /dev/loop3")
        self.store = QLineEdit()
        self.store.setPlaceholderText("where the history is kept")
        self.size_box = QSpinBox()
        self.size_box.setRange(0, 1 << 20)
        self.size_box.setSuffix(" MiB")
        self.size_box.setSpecialValueText("image exists")
        self.size_box.setToolTip("Only for a new image: creates a sparse file of this size")
        browse_img = QPushButton("Browse...")
        browse_img.clicked.connect(self._pick_image)
        browse_store = QPushButton("Browse...")
        browse_store.clicked.connect(self._pick_store)
        form = QFormLayout()
        row1 = QHBoxLayout()
        row1.addWidget(self.image, 1)
        row1.addWidget(browse_img)
        row2 = QHBoxLayout()
        row2.addWidget(self.store, 1)
        row2.addWidget(browse_store)
        form.addRow("Disk image or device:", row1)
        form.addRow("History folder:", row2)
        form.addRow("New image size:", self.size_box)
        note = QLabel("Protection starts at once, without copying the image: from now on every write "
                      "made through Rewind (its NBD socket, FUSE file or watch mode) is kept.")
        note.setWordWrap(True)
        note.setObjectName("muted")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Protect")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(note)
        lay.addWidget(buttons)
        self.image.textChanged.connect(self._suggest_store)
        self._auto_store = True
        self.store.textEdited.connect(lambda _t: setattr(self, "_auto_store", False))

    def _pick_image(self) -> None:
        path = files.save_path(self, "Disk image to protect (new or existing)", str(Path.home()),
                               confirm_overwrite=False)
        if path:
            self.image.setText(path)

    def _pick_store(self) -> None:
        path = files.existing_dir(self, "Folder for the history", str(Path.home()))
        if path:
            self.store.setText(path)
            self._auto_store = False

    def _suggest_store(self, text: str) -> None:
        if self._auto_store and text:
            self.store.setText(str(default_store_dir(text)))

    def values(self) -> tuple[str, str, int | None]:
        size = self.size_box.value()
        return self.image.text().strip(), self.store.text().strip(), (size << 20) if size else None
