"""File and folder pickers. The console asks for paths only through these two functions, so a
test can answer them as a person would (tests/gui/conftest.py `files` fixture) instead of
driving the platform's native dialog, which blocks in exec()."""

from __future__ import annotations

from PySide6.QtWidgets import QFileDialog, QWidget


def save_path(parent: QWidget | None, title: str, start: str, filters: str = "",
              confirm_overwrite: bool = True) -> str:
    """A path to write (new or existing); "" when the person cancelled."""
    options = QFileDialog.Option(0) if confirm_overwrite else QFileDialog.Option.DontConfirmOverwrite
    path, _ = QFileDialog.getSaveFileName(parent, title, start, filters, options=options)
    return str(path or "")


def existing_dir(parent: QWidget | None, title: str, start: str) -> str:
    """An existing folder; "" when the person cancelled."""
    return str(QFileDialog.getExistingDirectory(parent, title, start) or "")
