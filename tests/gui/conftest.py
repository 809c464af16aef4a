"""Console tests: pytest-qt, offscreen, one QApplication, the real engine underneath.

Every test gets its own data and config folders (XDG_*), so demos and recent lists never touch
the user's. Screenshots go to test-artifacts/screenshots/ (README copies live in docs/screenshots/)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import gc  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
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


class ErrorLog:
    """Error dialogs the console opened and exceptions that reached its error handler during a
    test. A test that expects one says so: `errors.expect("Verify found damage")` (a regex
    searched in the dialog's title and text); any other fails the test."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.expected: list[str] = []

    def expect(self, pattern: str) -> None:
        self.expected.append(pattern)

    def unexpected(self) -> list[str]:
        return [s for s in self.seen if not any(re.search(p, s, re.I | re.S) for p in self.expected)]


@pytest.fixture(autouse=True)
def errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[ErrorLog]:
    """Fail the test on any unexpected error dialog (app/dialogs/errors.py show_error) or any
    exception reaching the application's error handler (main._install_excepthook, installed here
    as the running console installs it: a slot that raises shows "Something went wrong")."""
    from rewind.app import main as appmain
    from rewind.app.dialogs import errors as errdlg

    log = ErrorLog()
    real_open = errdlg._open

    def recording_open(box: Any) -> Any:
        if box.objectName() == "errorDialog":
            log.seen.append(f"{box.windowTitle()}: {box.text()} {box.detailedText()}".strip())
        return real_open(box)

    monkeypatch.setattr(errdlg, "_open", recording_open)
    old_hook = sys.excepthook
    appmain._install_excepthook(lambda: None)
    try:
        yield log
    finally:
        sys.excepthook = old_hook
    bad = log.unexpected()
    if bad:
        pytest.fail("unexpected error dialog(s):\n" + "\n---\n".join(bad[:5]), pytrace=False)


def _running_qthreads() -> list[Any]:
    from PySide6.QtCore import QCoreApplication, QThread

    app = QCoreApplication.instance()
    main = app.thread() if app is not None else None
    out = []
    for o in gc.get_objects():
        try:
            if isinstance(o, QThread) and o is not main and o.isRunning():
                out.append(o)
        except RuntimeError:  # its C++ object is gone
            continue
    return out


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail a test that leaves threads running (Python threads, and QThreads such as a volume's
    lanes) it started, once a short grace period has passed after its teardown."""
    before_py = {t.ident for t in threading.enumerate()}
    before_qt = {id(t) for t in _running_qthreads()}
    yield

    def leaks() -> list[str]:
        # (a _DummyThread stands for a foreign thread, such as a QThread, that ran Python code: it
        # stays listed after that thread ends; QThreads are checked by themselves below)
        py = [t.name for t in threading.enumerate() if t.ident not in before_py and t.is_alive()
              and not isinstance(t, threading._DummyThread)]
        qt = [t.objectName() or "QThread" for t in _running_qthreads() if id(t) not in before_qt]
        return py + qt

    from PySide6.QtCore import QCoreApplication

    end = time.monotonic() + 5.0
    left = leaks()
    while left and time.monotonic() < end:
        app = QCoreApplication.instance()
        if app is not None:
            app.processEvents()
        time.sleep(0.05)
        left = leaks()
    if left:
        pytest.fail(f"the test left threads running: {', '.join(sorted(left))}", pytrace=False)


@pytest.fixture
def files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Answers to the console's file and folder pickers (app/dialogs/files.py), first in first
    out, as a person would type them; "" is Cancel. Asking with no answer left fails the test."""
    from rewind.app.dialogs import files as filedlg

    queue: list[str] = []

    def answer(parent: Any, title: str, *args: Any, **kwargs: Any) -> str:
        if not queue:
            raise AssertionError(f"the console asked for a path ({title!r}) but the test gave none")
        return queue.pop(0)

    monkeypatch.setattr(filedlg, "save_path", answer)
    monkeypatch.setattr(filedlg, "existing_dir", answer)
    return queue


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


def when_modal(app: Any, act: Callable[[Any], None], kind: Any = None, timeout: float = 10.0) -> None:
    """Answer the next modal dialog as a person would: once one is open (of class `kind`, when
    given), call act(dialog), e.g. type a name and press OK. For dialogs the console opens with
    exec() (QInputDialog.getText, ProtectDialog), which block until answered."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    end = time.monotonic() + timeout

    def poll() -> None:
        w = QApplication.activeModalWidget()
        if w is not None and (kind is None or isinstance(w, kind)) and w.isVisible():
            act(w)
        elif time.monotonic() < end:
            QTimer.singleShot(20, poll)

    QTimer.singleShot(20, poll)


def choose_folder(dlg: Any, folder: Any) -> None:
    """Answer the console's folder picker (a QFileDialog of its own) as a person pasting a path."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QDialogButtonBox, QLineEdit

    dlg.findChild(QLineEdit, "fileNameEdit").setText(str(folder))  # typing opens the completer's popup
    box = dlg.findChild(QDialogButtonBox)
    btn = next(b for b in box.buttons() if box.buttonRole(b) == QDialogButtonBox.ButtonRole.AcceptRole)
    QTest.mouseClick(btn, Qt.MouseButton.LeftButton)


def type_and_accept(text: str) -> Callable[[Any], None]:
    """For when_modal: type `text` into an input dialog's line edit and press its OK button."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QDialogButtonBox, QLineEdit

    def act(dlg: Any) -> None:
        edit = dlg.findChild(QLineEdit)
        edit.selectAll()
        QTest.keyClicks(edit, text)
        box = dlg.findChild(QDialogButtonBox)
        QTest.mouseClick(box.button(QDialogButtonBox.StandardButton.Ok), Qt.MouseButton.LeftButton)
    return act
