"""Console tests: pytest-qt, offscreen, one QApplication, the real engine underneath.

Every test gets its own data and config folders (XDG_*), so demos and recent lists never touch
the user's. Screenshots go to test-artifacts/screenshots/ (README copies live in docs/screenshots/)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "screenshots"


@pytest.fixture(scope="session")
def app(qapp: Any) -> Any:
    from rewind.app.main import make_app

    return make_app()


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from PySide6.QtCore import QSettings

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, str(tmp_path / "config"))
    return tmp_path


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Answers to the console's blocking questions (ask()), first in first out; default 0."""
    from rewind.app.dialogs import errors as errdlg

    queue: list[int] = []
    asked: list[str] = []

    def fake_ask(parent: Any, title: str, text: str, informative: str = "",
                 buttons: tuple[str, ...] = ("OK", "Cancel"), default: int = 0) -> int:
        asked.append(title)
        return queue.pop(0) if queue else 0

    monkeypatch.setattr(errdlg, "ask", fake_ask)
    queue_with_log: Any = queue
    return queue_with_log  # type: ignore[no-any-return]


@pytest.fixture
def window(app: Any, isolated: Path, answers: list[int], qtbot: Any) -> Iterator[Any]:
    from rewind.app.dialogs import errors as errdlg
    from rewind.app.main import MainWindow

    w = MainWindow(demo_root=str(isolated / "data" / "rewind" / "demo"))
    w.resize(1360, 880)
    w.show()
    qtbot.waitExposed(w)
    yield w
    for box in list(errdlg.OPEN_DIALOGS):
        box.done(0)
    w.close()
    app.processEvents()


def wait_until(app: Any, cond: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Process events until cond() is truthy; fail with `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        app.processEvents()
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")


def shot(widget: Any, name: str, dialog: Any = None) -> Path:
    """Save a screenshot of `widget` (with `dialog` drawn centred over it, as a user sees it)."""
    from PySide6.QtCore import QPoint
    from PySide6.QtGui import QColor, QPainter

    SHOTS.mkdir(parents=True, exist_ok=True)
    pix = widget.grab()
    if dialog is not None:
        dialog.adjustSize()
        d = dialog.grab()
        p = QPainter(pix)
        p.fillRect(pix.rect(), QColor(0, 0, 0, 70))
        x = (pix.width() - d.width()) // 2
        y = (pix.height() - d.height()) // 3
        p.fillRect(x - 1, y - 1, d.width() + 2, d.height() + 2, QColor(0, 0, 0, 120))
        p.drawPixmap(QPoint(x, y), d)
        p.end()
    path = SHOTS / f"{name}.png"
    pix.save(str(path))
    return path
