"""Light and dark palettes. Follows the desktop's colour scheme when Qt can tell, and keeps the
pyqtgraph charts in the same colours as the widgets around them."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

from .assets import resource_path


@dataclass(frozen=True)
class Colors:
    """Colours the custom-painted widgets and charts use, per palette."""

    dark: bool
    background: str
    panel: str
    text: str
    muted: str
    accent: str
    rate: str
    ops: str
    journal: str
    mark: str
    horizon: str
    added: str
    changed: str
    deleted: str
    cursor: str


LIGHT = Colors(False, "#ffffff", "#f3f5f8", "#1d232b", "#6b7480", "#1a6ae0", "#1a6ae0", "#20a080",
               "#8a4fd0", "#e08a00", "#c03030", "#1e8e3e", "#c77700", "#c5221f", "#d03060")
DARK = Colors(True, "#1e2127", "#262a31", "#e3e6ea", "#9aa3ad", "#5aa0ff", "#5aa0ff", "#3cc8a0",
              "#b58cff", "#ffb020", "#ff6b6b", "#5bd27a", "#ffb74d", "#ff6b6b", "#ff6fa0")

_current: Colors = LIGHT
_system_palette: QPalette | None = None  # the desktop's, kept before ours replaces it


def colors() -> Colors:
    """The palette in use now."""
    return _current


def system_prefers_dark(app: QGuiApplication) -> bool:
    """True when the desktop asks for a dark scheme (Qt >= 6.5), else judge by the window colour."""
    try:
        scheme = app.styleHints().colorScheme()
        if scheme == Qt.ColorScheme.Dark:
            return True
        if scheme == Qt.ColorScheme.Light:
            return False
    except AttributeError:
        pass
    # not app.palette(): after View > Dark that is our own dark palette, not the desktop's
    palette = _system_palette if _system_palette is not None else app.palette()
    return palette.color(QPalette.ColorRole.Window).lightness() < 128


def _palette(c: Colors) -> QPalette:
    p = QPalette()
    role = QPalette.ColorRole
    window = QColor(c.panel)
    base = QColor(c.background)
    text = QColor(c.text)
    p.setColor(role.Window, window)
    p.setColor(role.WindowText, text)
    p.setColor(role.Base, base)
    p.setColor(role.AlternateBase, window)
    p.setColor(role.Text, text)
    p.setColor(role.Button, window if c.dark else QColor("#e9edf2"))
    p.setColor(role.ButtonText, text)
    p.setColor(role.ToolTipBase, base)
    p.setColor(role.ToolTipText, text)
    p.setColor(role.PlaceholderText, QColor(c.muted))
    p.setColor(role.Highlight, QColor(c.accent))
    p.setColor(role.HighlightedText, QColor("#ffffff"))
    p.setColor(role.Link, QColor(c.accent))
    p.setColor(role.BrightText, QColor(c.deleted))
    disabled = QPalette.ColorGroup.Disabled
    p.setColor(disabled, role.Text, QColor(c.muted))
    p.setColor(disabled, role.WindowText, QColor(c.muted))
    p.setColor(disabled, role.ButtonText, QColor(c.muted))
    return p


def apply_theme(app: QApplication, mode: str = "auto") -> Colors:
    """Set Fusion with our light or dark palette ('auto' follows the desktop) and the style sheet."""
    global _current, _system_palette
    if _system_palette is None:
        _system_palette = QPalette(app.palette())
    dark = system_prefers_dark(app) if mode == "auto" else mode == "dark"
    _current = DARK if dark else LIGHT
    app.setStyle("Fusion")
    app.setPalette(_palette(_current))
    qss = resource_path("rewind.qss")
    if qss is not None:
        sheet = qss.read_text()
        for key, value in vars(_current).items():
            sheet = sheet.replace("@" + key, str(value))
        app.setStyleSheet(sheet)
    if "pyqtgraph" in sys.modules:
        configure_charts()
    return _current


def configure_charts() -> None:
    """pyqtgraph's colours for the palette in use (imported only when a chart is first made:
    pyqtgraph costs half a second to import, the welcome view does not need it)."""
    import pyqtgraph as pg

    # no antialiasing: the curves are axis-aligned steps, and antialiased paths cost the GUI
    # thread tens of milliseconds per repaint (measured: 35-80 ms on a busy 2-core machine)
    pg.setConfigOptions(background=_current.background, foreground=_current.text, antialias=False)
