"""Loud, useful failures: every engine error becomes a dialog that says what happened and what to
do, with the technical details folded away. Dialogs are opened non-blocking (QDialog.open), so
a worker's error never stops the event loop and tests can find and dismiss them."""

from __future__ import annotations

import errno
from typing import Any

from PySide6.QtWidgets import QMessageBox, QWidget
from rewind.engine.errors import (
    BadInput,
    Cancelled,
    CorruptionError,
    NoSpace,
    ReadOnlyError,
    RewindError,
    StoreLocked,
)

# every dialog opened here, newest last (tests inspect and close them)
OPEN_DIALOGS: list[QMessageBox] = []


def explain(e: BaseException, doing: str = "") -> tuple[str, str]:
    """(what happened, what to do) for an exception from the engine or the system."""
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, CorruptionError):
        path = getattr(e, "path", "") or ""
        offset = getattr(e, "offset", -1)
        where = ""
        if path and path not in msg:
            where = f" ({path}" + (f" at offset {offset}" if offset is not None and offset >= 0 else "") + ")"
        return (f"The protection's history is damaged{where}: {msg}",
                "Rewind never serves damaged data. Run Verify to see what is affected; points that still "
                "read can be exported. If the store cannot be opened, protect the image again into a new "
                "folder (the image itself is unharmed).")
    if isinstance(e, NoSpace) and msg.lower().startswith("no space left"):
        return (f"The disk is full: {msg}",
                "Free some space on that disk (or pick another place), then try again. "
                "Nothing half-written was left behind.")
    if isinstance(e, NoSpace):
        return (f"The journal is full: {msg}",
                "Free space on the disk that holds the protection, or raise its space limit / shorten "
                "its retention (rewind retention), then continue.")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"The disk is full: {msg}",
                "Free some space on that disk (or pick another place), then try again. "
                "Nothing half-written was left behind.")
    if isinstance(e, FileNotFoundError):
        name = e.filename or msg
        return (f"{name} is missing.",
                "It was moved, renamed or deleted. Put it back where it was, or open another protection.")
    if isinstance(e, PermissionError):
        return (f"Permission denied: {e.filename or msg}",
                "Pick a file or folder you can write to, or run with the rights to use that device.")
    if isinstance(e, StoreLocked):
        return (msg, "Stop the other Rewind process (for example `rewind serve`), then open the store again.")
    if isinstance(e, ReadOnlyError):
        return (msg, "Past points are read-only. Export the point, or rewind to it.")
    if isinstance(e, BadInput):
        return (msg, "Check the file or folder you picked and try again.")
    if isinstance(e, Cancelled):
        return (msg, "Nothing was left half-done.")
    if isinstance(e, RewindError):
        return (msg, "See the details below; the protection itself is kept consistent.")
    if isinstance(e, OSError):
        return (f"{msg}", "Check that the disk and the files involved are reachable, then try again.")
    return (f"Unexpected error{(' while ' + doing) if doing else ''}: {msg}",
            "Rewind kept running. If this repeats, report it with the details below.")


def show_error(parent: QWidget | None, title: str, e: BaseException | str, doing: str = "",
               details: str = "", todo: str = "") -> QMessageBox:
    """Open (non-blocking) an error dialog for `e`; returns it."""
    if isinstance(e, BaseException):
        what, said = explain(e, doing)
        todo = todo or said
        details = details or getattr(e, "__rewind_traceback__", "") or f"{type(e).__name__}: {e}"
    else:
        what = e
    box = _box(parent, QMessageBox.Icon.Critical, title, what, todo)
    if details:
        box.setDetailedText(details)
    box.setStandardButtons(QMessageBox.StandardButton.Ok)
    box.setObjectName("errorDialog")
    return _open(box)


def show_info(parent: QWidget | None, title: str, text: str, informative: str = "") -> QMessageBox:
    return _open(_box(parent, QMessageBox.Icon.Information, title, text, informative))


def ask(parent: QWidget | None, title: str, text: str, informative: str = "",
        buttons: tuple[str, ...] = ("OK", "Cancel"), default: int = 0) -> int:
    """A blocking question; returns the index of the button chosen (last = cancel/escape).
    Tests replace this function to answer without a person."""
    box = _box(parent, QMessageBox.Icon.Question, title, text, informative)
    made: list[Any] = []
    for i, label in enumerate(buttons):
        role = QMessageBox.ButtonRole.RejectRole if i == len(buttons) - 1 else QMessageBox.ButtonRole.AcceptRole
        made.append(box.addButton(label, role))
    box.setDefaultButton(made[default])
    box.setEscapeButton(made[-1])
    box.exec()
    clicked = box.clickedButton()
    return made.index(clicked) if clicked in made else len(buttons) - 1


def _box(parent: QWidget | None, icon: QMessageBox.Icon, title: str, text: str, informative: str | None) -> QMessageBox:
    box = QMessageBox(parent)
    box.setIcon(icon)
    box.setWindowTitle(title)
    box.setText(text)
    if informative:
        box.setInformativeText(informative)
    return box


def _open(box: QMessageBox) -> QMessageBox:
    """Show a window-modal box without blocking; kept referenced until it closes."""
    OPEN_DIALOGS.append(box)
    box.finished.connect(lambda _r, b=box: OPEN_DIALOGS.remove(b) if b in OPEN_DIALOGS else None)
    box.open()
    return box
