"""Protect a disk image: pick the image (or a block device) and where its history goes
(by default under the user's data directory)."""

from __future__ import annotations

import errno
import os
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

from ..theme import colors
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


def store_folder_problem(folder: str) -> str:
    """'' when the history can go in `folder`, else one plain sentence saying why not and what to
    do. Creating the folder is tried for real (then undone): only that tells e.g. /proc apart."""
    if not folder.strip():
        return "Pick a folder for the history."
    d = Path(folder).expanduser().absolute()
    if d.exists():
        if not d.is_dir():
            return f"{d} is a file, not a folder. Pick a folder for the history."
        if (d / "store.json").exists():
            return f"{d} already holds a protection. Open it (File > Open a protection), or pick another folder."
        if any(d.iterdir()):
            return f"{d} is not empty. Pick a new or empty folder for the history."
        return "" if os.access(d, os.W_OK | os.X_OK) else f"You cannot write in {d}. Pick another folder."
    made: list[Path] = []
    try:
        for p in reversed([d, *d.parents]):
            if not p.exists():
                p.mkdir(mode=0o700)
                made.append(p)
    except OSError as e:
        at = made[-1] if made else next((p for p in d.parents if p.exists()), d.parent)
        why = {errno.EACCES: f"you cannot write in {at}", errno.EPERM: f"{at} does not allow it",
               errno.EROFS: f"{at} is read-only", errno.ENOSPC: f"the disk holding {at} is full",
               errno.ENOENT: f"{at} does not take new folders"}.get(e.errno or 0, e.strerror or str(e))
        return f"Cannot create a folder at {d}: {why}. Pick another place for the history."
    finally:
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                pass
    return ""


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
        self.error_label = QLabel("")  # why the history folder cannot be used (the dialog stays open)
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet(f"color: {colors().deleted}; font-weight: 600;")
        self.error_label.hide()
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.error_label)
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

    def accept(self) -> None:
        """Refuse a history folder that cannot be made here, while the user can still fix it."""
        problem = store_folder_problem(self.store.text()) if self.image.text().strip() else \
            "Pick a disk image (or a device) to protect."
        if problem:
            self.error_label.setText(problem)
            self.error_label.show()
            (self.store if self.image.text().strip() else self.image).setFocus()
            return
        self.error_label.hide()
        super().accept()

    def values(self) -> tuple[str, str, int | None]:
        size = self.size_box.value()
        return self.image.text().strip(), self.store.text().strip(), (size << 20) if size else None
