"""Before any fade the console says what it will remove and asks, Cancel being the default: a
fade cannot be undone. Opened non-blocking (open()), like the rewind confirmation."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QMessageBox, QWidget

from ..format import human_time

MAX_NAMES = 8


def fade_text(info: dict[str, Any], title: str, apply: bool) -> tuple[str, str]:
    """(what will go, what stays) in plain words, from store.fade_preview()."""
    points = int(info.get("points", 0))
    marks = [str(m) for m in info.get("marks", [])]
    kept = [str(m) for m in info.get("kept_marks", [])]
    hz = info.get("horizon") or {}
    when = human_time(int(hz.get("time_ns", 0)), with_date=True) if hz.get("time_ns") else "the horizon"
    lead = (f"With this policy, the next fade of {title} (Fade now, or `rewind serve` within a minute) "
            if apply else f"Fading {title} now ")
    if points == 0 and not marks:
        what = lead + "removes no point in time: it only frees space that nothing needs."
    else:
        what = lead + f"removes {points:,} point{'s' if points != 1 else ''} in time"
        if marks:
            shown = ", ".join(f"“{m}”" for m in marks[:MAX_NAMES])
            more = f" and {len(marks) - MAX_NAMES} more" if len(marks) > MAX_NAMES else ""
            what += f" and {len(marks)} mark{'s' if len(marks) != 1 else ''} Rewind made: {shown}{more}"
        what += ". This cannot be undone."
    stays = f"The oldest moment that stays: {when}."
    if kept:
        shown = ", ".join(f"“{m}”" for m in kept[:MAX_NAMES])
        more = f" and {len(kept) - MAX_NAMES} more" if len(kept) > MAX_NAMES else ""
        stays += f" Your marks stay (kept until you remove them): {shown}{more}."
    if info.get("over_limit"):
        stays += " The journal is over its space limit, so older history may fade early as well."
    return what, stays


class FadeConfirm(QMessageBox):
    """Fade (or Apply) and Cancel; Cancel is the default button and Escape."""

    def __init__(self, parent: QWidget | None, info: dict[str, Any], title: str, apply: bool = False) -> None:
        super().__init__(parent)
        self.setObjectName("fadeConfirm")
        self.setIcon(QMessageBox.Icon.Warning)
        self.setWindowTitle("Apply the retention policy?" if apply else "Fade now?")
        what, stays = fade_text(info, title, apply)
        self.setText(what)
        self.setInformativeText(stays)
        self.info = info
        self.fade_button = self.addButton("Apply" if apply else "Fade", QMessageBox.ButtonRole.AcceptRole)
        self.cancel_button = self.addButton(QMessageBox.StandardButton.Cancel)
        self.setDefaultButton(self.cancel_button)
        self.setEscapeButton(self.cancel_button)
