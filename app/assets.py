"""Where the console finds its icon and style sheet: next to the package when installed
(rewind/app/resources), else the repository's resources/ folder (editable checkout)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Qt is imported lazily: this module stays importable without it
    from PySide6.QtGui import QIcon

_HERE = Path(__file__).resolve().parent
_CANDIDATES = (_HERE / "resources", _HERE.parent / "resources")


def resource_path(name: str) -> Path | None:
    """The first existing file called `name` among the resource folders, or None."""
    for folder in _CANDIDATES:
        p = folder / name
        if p.exists():
            return p
    return None


def app_icon() -> QIcon:
    """The application icon at every size we ship (SVG scales for HiDPI; PNGs for trays)."""
    from PySide6.QtGui import QIcon

    icon = QIcon()
    for name in ("rewind.svg", "rewind-256.png", "rewind-128.png", "rewind-48.png"):
        p = resource_path(name)
        if p is not None:
            icon.addFile(str(p))
    return icon
