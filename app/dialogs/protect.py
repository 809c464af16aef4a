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
    QFileDialog,
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
        self.image_problem = _problem_label()  # what is wrong with the image, said while typing
        form.addRow("", self.image_problem)
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
        self._protect_button = buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.image.textChanged.connect(self._check_image)
        self.size_box.valueChanged.connect(self._check_image)

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

    def _check_image(self, _v: object = None) -> None:
        """Say what is wrong with the image next to it, in the dialog's own words (the engine's
        would be command-line words: "give --size"), and hold Protect back until it is fixed."""
        text = self.image.text().strip()
        problem = image_problem(text, self.size_box.value() << 20) if text else ""
        self.image_problem.setText(problem)
        self.image_problem.setVisible(bool(problem))
        self._protect_button.setEnabled(not problem)


def _problem_label() -> QLabel:
    from ..theme import colors

    label = QLabel("")
    label.setWordWrap(True)
    label.setObjectName("problem")
    label.setStyleSheet(f"color: {colors().deleted};")
    label.hide()
    return label


def image_problem(image: str, size: int) -> str:
    """'' when `image` can be protected (with `size` bytes for a new one, 0: it exists), else
    one plain sentence saying what to change in the dialog."""
    p = Path(image).expanduser()
    if p.is_dir():
        return "This is a folder: pick a disk image file (or a device)."
    if not p.exists():
        if not p.parent.is_dir():
            return f"The folder {p.parent} does not exist: pick an image in a folder that does."
        if not size:
            return "There is no image here yet. To make a new, empty one, set its size in “New image size”."
        return ""
    if p.is_block_device() or not p.is_file():
        return "" if not size else "This is a device: set “New image size” back to “image exists”."
    have = p.stat().st_size
    if size and size != have:
        return (f"This image exists already ({have >> 20} MiB): set “New image size” back to "
                "“image exists” to protect it as it is.")
    if have == 0:
        return "This image is empty (0 bytes): pick one with data, or delete it and set a size to make a new one."
    if have % 4096:
        return f"This image is {have:,} bytes, not a whole number of 4 KiB blocks: Rewind cannot protect it."
    return ""


def history_problem(folder: str) -> str:
    """'' when `folder` holds a protection's history, else one plain sentence on what to pick."""
    d = Path(folder).expanduser()
    if not folder.strip() or not d.is_dir():
        return f"There is no folder {d}: pick the history folder of a protection."
    if (d / "store.json").is_file():
        return ""
    for up in d.parents:
        if (up / "store.json").is_file():
            return f"This is inside the history folder {up}: pick “{up.name}” itself."
    try:
        inside = sorted(c.name for c in d.iterdir() if (c / "store.json").is_file())
    except OSError:
        inside = []
    if inside:
        names = ", ".join(f"“{n}”" for n in inside[:3]) + (" ..." if len(inside) > 3 else "")
        return f"This folder holds histories ({names}): pick one of them."
    return ("This folder holds no Rewind history. Pick the folder chosen as “History folder” when the "
            "image was protected, or protect an image first.")


class OpenDialog(QFileDialog):
    """Pick a protection's history folder; a folder that holds none is said so here, next to the
    choice, and the dialog stays open (it used to close and leave a "Failed to open" entry)."""

    def __init__(self, parent: QWidget | None = None, start: str = "") -> None:
        super().__init__(parent, "Open a protection (its history folder)", start or str(Path.home()))
        self.setObjectName("openProtection")
        self.setOption(QFileDialog.Option.DontUseNativeDialog)  # the message goes inside it
        self.setFileMode(QFileDialog.FileMode.Directory)
        self.setOption(QFileDialog.Option.ShowDirsOnly)
        self.problem = _problem_label()
        from PySide6.QtWidgets import QGridLayout

        lay = self.layout()
        if isinstance(lay, QGridLayout):
            lay.addWidget(self.problem, lay.rowCount(), 0, 1, lay.columnCount())

        self._folder = ""

    def _chosen(self) -> str:
        """The folder typed or picked: a full path typed wins; else the newest selection (a folder
        refused before stays selected and selectedFiles() lists it first)."""
        from PySide6.QtWidgets import QLineEdit

        line = self.findChild(QLineEdit, "fileNameEdit")
        text = line.text().strip() if line is not None else ""
        if text.startswith(("/", "~")) and '"' not in text:
            return str(Path(text).expanduser())
        chosen = self.selectedFiles()
        return chosen[-1] if chosen else self.directory().absolutePath()

    def accept(self) -> None:
        folder = self._chosen()
        problem = history_problem(folder)
        if problem:
            self.problem.setText(problem)
            self.problem.show()
            return
        self.problem.hide()
        self._folder = folder
        QDialog.accept(self)  # QFileDialog's own accept would act on its first selection, not this one

    def folder(self) -> str:
        return self._folder
