"""The Rewind console: `rewind` with no arguments opens it (rewind.app.main.main).

A main window with the list of open protections at the side, the welcome view or one volume view
per protection, a status bar, a tray icon, and desktop notifications when something needs the
user (protection stopped, a write failed, verify found damage)."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QCoreApplication, QEvent, QSettings, QSignalBlocker, QSize, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMenu,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QSystemTrayIcon,
    QVBoxLayout,
    QWidget,
)

from .assets import app_icon
from .dialogs import errors as errdlg
from .dialogs.protect import ProtectDialog, store_folder_problem
from .format import human_bytes, human_time
from .theme import apply_theme
from .views.welcome import WelcomeView

if TYPE_CHECKING:  # the volume view pulls in pyqtgraph, numpy and pytsk3: loaded on first use
    from .views.volume import VolumeView
    from .workers import Snapshot

APP_NAME = "Rewind"
ORG = "rewind"
MAX_RECENT = 8


class MainWindow(QMainWindow):
    def __init__(self, demo_root: str | None = None) -> None:
        super().__init__()
        self.setWindowTitle(APP_NAME)
        self.setWindowIcon(app_icon())
        self.demo_root = demo_root
        self.views: list[VolumeView] = []
        self.settings = QSettings(ORG, "console")
        self._quitting = False
        self.notifications: list[tuple[str, str, str]] = []
        self._build()
        self._build_menus()
        self._build_tray()
        self.welcome.set_recent(self.recent())
        self.resize(self._default_size())

    def _default_size(self) -> QSize:
        screen = QGuiApplication.primaryScreen()
        if screen is None:
            return QSize(1280, 820)
        avail = screen.availableGeometry()
        return QSize(min(1360, int(avail.width() * 0.85)), min(880, int(avail.height() * 0.85)))

    # -- layout -----------------------------------------------------------------------------------
    def _build(self) -> None:
        self.volume_list = QListWidget()
        self.volume_list.setObjectName("volumeList")
        self.volume_list.setWordWrap(True)
        self.volume_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.volume_list.setIconSize(QSize(28, 28))
        self.volume_list.currentRowChanged.connect(self._on_select)
        self.volume_list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.volume_list.customContextMenuRequested.connect(self._list_menu)
        home = QListWidgetItem(app_icon(), "Welcome")
        self.volume_list.addItem(home)
        add = QPushButton("+  Add...")
        add.setToolTip("Protect an image, open a protection or try the demo")
        add_menu = QMenu(add)
        add_menu.addAction("Protect a disk image...", self.protect_image)
        add_menu.addAction("Open a protection...", self.open_protection)
        add_menu.addAction("Try the demo", lambda: self.open_demo())  # not triggered(bool) as `interval`
        add.setMenu(add_menu)
        side = QWidget()
        sl = QVBoxLayout(side)
        sl.setContentsMargins(6, 8, 0, 8)
        heading = QLabel("Protections")
        heading.setObjectName("muted")
        sl.addWidget(heading)
        sl.addWidget(self.volume_list, 1)
        sl.addWidget(add)
        side.setMinimumWidth(190)
        side.setMaximumWidth(320)

        self.stack = QStackedWidget()
        self.welcome = WelcomeView()
        self.welcome.protectRequested.connect(self.protect_image)
        self.welcome.openRequested.connect(self.open_protection)
        self.welcome.demoRequested.connect(lambda: self.open_demo())
        self.welcome.recentRequested.connect(self.open_store)
        self.stack.addWidget(self.welcome)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(side)
        split.addWidget(self.stack)
        split.setStretchFactor(1, 1)
        split.setSizes([230, 1100])
        self.setCentralWidget(split)

        sb = self.statusBar()
        self.st_journal = QLabel()
        self.st_horizon = QLabel()
        self.st_writes = QLabel()
        self.st_front = QLabel()
        for w in (self.st_journal, self.st_horizon, self.st_writes, self.st_front):
            w.setContentsMargins(8, 0, 8, 0)
            sb.addPermanentWidget(w)
        self._show_status(None)

    def _build_menus(self) -> None:
        m = self.menuBar().addMenu("&File")
        a = m.addAction("&Protect a disk image...", self.protect_image)
        a.setShortcut(QKeySequence.StandardKey.New)
        a = m.addAction("&Open a protection...", self.open_protection)
        a.setShortcut(QKeySequence.StandardKey.Open)
        m.addAction("Try the &demo", lambda: self.open_demo())
        m.addSeparator()
        a = m.addAction("&Close this protection", self.close_current)
        a.setShortcut(QKeySequence.StandardKey.Close)
        self.volume_actions = [a]  # enabled only while a protection is selected (_update_actions)
        m.addSeparator()
        a = m.addAction("&Quit", self.quit)
        a.setShortcut(QKeySequence("Ctrl+Q"))  # StandardKey.Quit is empty on some platform themes
        a.setShortcutContext(Qt.ShortcutContext.ApplicationShortcut)  # also from a job's progress window
        v = self.menuBar().addMenu("&Volume")
        a = v.addAction("&Mark now", lambda: self._current_call("mark_now"))
        a.setShortcut(QKeySequence("Ctrl+M"))
        self.open_actions = [a]  # enabled only while the selected protection is open
        a = v.addAction("&Export this point...", lambda: self._current_call("export_point"))
        a.setShortcut(QKeySequence("Ctrl+E"))
        self.open_actions.append(a)
        self.open_actions.append(v.addAction("&Rewind to this point...", lambda: self._current_call("rewind_point")))
        self.open_actions.append(v.addAction("&Verify", lambda: self._current_call("verify")))
        v.aboutToShow.connect(self._update_actions)
        m.aboutToShow.connect(self._update_actions)
        self._update_actions()
        view = self.menuBar().addMenu("&View")
        for label, mode in (("Follow the desktop", "auto"), ("Light", "light"), ("Dark", "dark")):
            act = QAction(label, self)
            act.triggered.connect(lambda _c=False, md=mode: self.set_theme(md))
            view.addAction(act)
        h = self.menuBar().addMenu("&Help")
        h.addAction("&About Rewind", self.about)

    def _build_tray(self) -> None:
        self.tray: QSystemTrayIcon | None = None
        if not QSystemTrayIcon.isSystemTrayAvailable():
            return
        self.tray = QSystemTrayIcon(app_icon(), self)
        self.tray.setToolTip(APP_NAME)
        menu = QMenu()
        menu.addAction("Show Rewind", self.show_window)
        menu.addSeparator()
        menu.addAction("Quit", self.quit)
        self.tray.setContextMenu(menu)
        self.tray.activated.connect(lambda reason: self.show_window()
                                    if reason == QSystemTrayIcon.ActivationReason.Trigger else None)
        self.tray.show()

    # -- helpers ----------------------------------------------------------------------------------
    def current_view(self) -> VolumeView | None:
        w = self.stack.currentWidget()
        return None if w is self.welcome or w is None else w  # type: ignore[return-value]

    def _update_actions(self) -> None:
        """Menu items that act on a protection are greyed out while none is selected (or open)."""
        v = self.current_view()
        for a in self.volume_actions:
            a.setEnabled(v is not None)
        for a in self.open_actions:
            a.setEnabled(v is not None and v.snap is not None)

    def _current_call(self, name: str) -> None:
        v = self.current_view()
        if v is not None and v.snap is not None:
            getattr(v, name)()

    def show_window(self) -> None:
        self.showNormal()
        self.raise_()
        self.activateWindow()

    def set_theme(self, mode: str) -> None:
        app = QApplication.instance()
        if isinstance(app, QApplication):
            apply_theme(app, mode)
            self.settings.setValue("theme", mode)  # the charts and lists follow at once

    def about(self) -> None:
        errdlg.show_info(self, "About Rewind",
                         "Rewind: continuous data protection for Linux disk images.",
                         "Every write kept; any moment back. GPL-3.0-or-later.")

    def notify(self, title: str, message: str, level: str = "info") -> None:
        """A desktop notification through the tray (and the status bar always)."""
        self.statusBar().showMessage(f"{title}: {message}", 8000)
        if (self.tray is None or not self.tray.isVisible()) and level != "info":
            desktop_notify(title, message, level)
        elif self.tray is not None and self.tray.isVisible():
            icon = {"info": QSystemTrayIcon.MessageIcon.Information,
                    "warning": QSystemTrayIcon.MessageIcon.Warning,
                    "critical": QSystemTrayIcon.MessageIcon.Critical}.get(level, QSystemTrayIcon.MessageIcon.Information)
            if level != "info" or not self.isActiveWindow():
                self.tray.showMessage(title, message, icon, 8000)
        self.notifications.append((title, message, level))

    # -- recent -----------------------------------------------------------------------------------
    def recent(self) -> list[str]:
        v = self.settings.value("recent", [])
        items = [v] if isinstance(v, str) else list(v or [])
        return [d for d in items if Path(d, "store.json").exists()][:MAX_RECENT]

    def _remember(self, store_dir: str) -> None:
        items = [d for d in self.recent() if d != store_dir]
        self.settings.setValue("recent", [store_dir, *items][:MAX_RECENT])
        self.welcome.set_recent(self.recent())

    # -- opening ------------------------------------------------------------------------------------
    def _add_view(self, title: str, demo: bool = False, start: Any = None) -> VolumeView:
        """A volume view and its worker. `start(worker)` is called before the view is built, so
        the store opens in the worker thread while this thread imports and lays out the view."""
        from .workers import VolumeWorker

        worker = VolumeWorker(title)
        worker.opened.connect(lambda snap, w=worker: self._remember(str(w.link.dir)) if w.link else None)
        if start is not None:
            start(worker)
        from .views.volume import VolumeView

        view = VolumeView(worker, title, demo=demo)
        self.views.append(view)
        self.stack.addWidget(view)
        item = QListWidgetItem(app_icon(), f"{title}\nOpening...")
        item.setSizeHint(QSize(180, 54))
        self.volume_list.addItem(item)

        def refresh_item(_s: str = "") -> None:
            if view in self.views:
                row = self.views.index(view) + 1
                self.volume_list.item(row).setText(f"{view.title}\n{view.state}")
                self._update_tray()
                self._update_actions()

        view.stateChanged.connect(refresh_item)
        view.titleChanged.connect(refresh_item)
        view.statusChanged.connect(lambda snap, v=view: self._show_status(snap) if v is self.current_view() else None)
        view.notify.connect(self.notify)
        view.openFailed.connect(lambda: QTimer.singleShot(0, self, lambda: self.close_view(view, ask=False)
                                                          if view in self.views else None))
        self.volume_list.setCurrentRow(self.volume_list.count() - 1)
        return view

    def open_store(self, store_dir: str) -> VolumeView | None:
        for v in self.views:
            if v.worker.link is not None and str(v.worker.link.dir) == str(Path(store_dir).absolute()):
                self.volume_list.setCurrentRow(self.views.index(v) + 1)
                return v
        return self._add_view(Path(store_dir).name, start=lambda w: w.open(store_dir))

    def open_protection(self) -> None:
        from .dialogs.protect import OpenDialog

        dlg = OpenDialog(self)
        if dlg.exec() == OpenDialog.DialogCode.Accepted and dlg.folder():
            self.open_store(dlg.folder())
        dlg.deleteLater()

    def protect_image(self, image: str | bool = "") -> None:
        dlg = ProtectDialog(self)
        if isinstance(image, str) and image:  # `rewind disk.img` from a file manager
            dlg.image.setText(image)
        try:
            if dlg.exec() != ProtectDialog.DialogCode.Accepted:
                return
            image, store, size = dlg.values()
        finally:
            dlg.deleteLater()  # not left as the window's child until exit (a crash at interpreter exit)
        self.protect(image, store, size)

    def protect(self, image: str, store: str, size: int | None = None) -> VolumeView | None:
        """Start protecting `image` with its history in `store` (the dialog's work, testable)."""
        if not image or not store:
            errdlg.show_error(self, "Cannot protect", "Pick both a disk image and a folder for its history.")
            return None
        problem = store_folder_problem(store)
        if problem:  # e.g. /proc/foo: one plain sentence, no traceback
            errdlg.show_error(self, "Cannot protect", problem)
            return None
        try:
            Path(store).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            errdlg.show_error(self, "Cannot protect", e, doing="creating the history folder")
            return None
        return self._add_view(Path(image).name, start=lambda w: w.create(image, store, size))

    def open_demo(self, interval: float = 0.15, seed: int | None = None) -> VolumeView:
        return self._add_view("Demo disk", demo=True,
                              start=lambda w: w.create_demo(self.demo_root, interval=interval, seed=seed))

    def _on_select(self, row: int) -> None:
        if row <= 0:
            self.stack.setCurrentWidget(self.welcome)
            self._show_status(None)
            self._update_actions()
            return
        view = self.views[row - 1]
        self.stack.setCurrentWidget(view)
        self._show_status(view.snap)
        self._update_actions()

    def _list_menu(self, pos: Any) -> None:
        row = self.volume_list.indexAt(pos).row()
        if row <= 0:
            return
        menu = QMenu(self)
        menu.addAction("Close", lambda: self.close_view(self.views[row - 1]))
        menu.exec(self.volume_list.mapToGlobal(pos))

    def close_current(self) -> None:
        v = self.current_view()
        if v is not None:
            self.close_view(v)

    def close_view(self, view: VolumeView, ask: bool = True) -> bool:
        if ask and view.worker.busy:
            choice = errdlg.ask(self, "A job is running",
                                f"{view.title}: {view.worker.job_kind} is still running.",
                                "Stop it and close? A cancelled export leaves no file behind.",
                                ("Stop and close", "Keep running"))
            if choice != 0:
                return False
        if ask and view.snap is not None and view.snap.served:
            if errdlg.ask(self, "The volume is being served", f"{view.title} is served at {view.snap.served}.",
                          "Closing stops serving it: programs using it lose their disk. Close anyway?",
                          ("Stop serving and close", "Keep it open")) != 0:
                return False
        view.refresh_timer.stop()
        view.worker.close()
        row = self.views.index(view) + 1
        self.views.remove(view)
        # taking the current row moves the selection while `views` and the list disagree
        # (currentRowChanged names a row past the end): select once, after both changed
        with QSignalBlocker(self.volume_list):
            self.volume_list.takeItem(row)
        self.stack.removeWidget(view)
        self._on_select(self.volume_list.currentRow())
        view.deleteLater()
        self._update_tray()
        return True

    # -- status -----------------------------------------------------------------------------------
    def _show_status(self, snap: Snapshot | None) -> None:
        if snap is None:
            self.st_journal.setText("")
            self.st_horizon.setText("")
            self.st_writes.setText("")
            self.st_front.setText("No protection selected" if not self.views else "")
            return
        limit = f" of {human_bytes(snap.max_size)}" if snap.max_size else ""
        self.st_journal.setText(f"Journal {human_bytes(max(0, snap.journal_bytes))}{limit}")
        self.st_horizon.setText(f"Horizon {human_time(snap.horizon_time)}")
        self.st_writes.setText(f"{snap.total_writes:,} writes journaled · record {snap.head:,}")
        if snap.remote:
            front = "Attached to rewind serve"
        elif snap.served:
            front = f"NBD: serving ({snap.connections} client{'s' if snap.connections != 1 else ''})"
        else:
            front = "NBD: not served"
        self.st_front.setText(front)

    def _update_tray(self) -> None:
        if self.tray is None:
            return
        served = sum(1 for v in self.views if v.snap is not None and v.snap.served)
        states = [f"{v.title}: {v.state}" for v in self.views]
        tip = APP_NAME + ("\n" + "\n".join(states) if states else "")
        if served:
            tip += f"\n{served} volume(s) served"
        self.tray.setToolTip(tip)

    # -- closing ----------------------------------------------------------------------------------
    def quit(self) -> None:
        self._quitting = True
        self.close()

    def closeEvent(self, event: QCloseEvent) -> None:
        busy = [v for v in self.views if v.worker.busy]
        if busy:
            names = ", ".join(f"{v.title} ({v.worker.job_kind})" for v in busy)
            if errdlg.ask(self, "Jobs are running", f"Still running: {names}.",
                          "Stop them and quit? A cancelled export leaves no file behind.",
                          ("Stop and quit", "Keep running")) != 0:
                event.ignore()
                return
        served = [v for v in self.views if v.snap is not None and v.snap.served]
        if served and not self._quitting and self.tray is not None:
            choice = errdlg.ask(self, "Volumes are being served",
                                f"{len(served)} volume(s) are served: closing stops protecting them.",
                                "Keep protecting in the tray, or stop serving and quit?",
                                ("Keep in tray", "Stop and quit", "Cancel"))
            if choice == 0:
                event.ignore()
                self.hide()
                self.notify("Rewind keeps protecting", "Served volumes stay protected; the tray icon brings "
                            "the window back.", "info")
                return
            if choice == 2:
                event.ignore()
                return
        elif served:
            if errdlg.ask(self, "Volumes are being served",
                          f"{len(served)} volume(s) are served: quitting stops serving and protecting them.",
                          "Programs using them (VMs, mounts) lose their disk. Quit anyway?",
                          ("Stop and quit", "Cancel")) != 0:
                event.ignore()
                self._quitting = False
                return
        for v in list(self.views):
            self.close_view(v, ask=False)
        if self.tray is not None:
            self.tray.hide()
        event.accept()


# -- application ------------------------------------------------------------------------------------

def desktop_notify(title: str, message: str, level: str = "warning") -> bool:
    """A desktop notification over D-Bus (org.freedesktop.Notifications) for desktops without a
    tray (GNOME): a silent stop is what backup users complain about most. False if no bus."""
    try:
        from PySide6.QtDBus import QDBusConnection, QDBusInterface
    except ImportError:
        return False
    bus = QDBusConnection.sessionBus()
    if not bus.isConnected():
        return False
    iface = QDBusInterface("org.freedesktop.Notifications", "/org/freedesktop/Notifications",
                           "org.freedesktop.Notifications", bus)
    if not iface.isValid():
        return False
    urgency = {"info": 0, "warning": 1, "critical": 2}.get(level, 1)
    from PySide6.QtCore import QByteArray  # noqa: F401 - keeps the hints' variant types importable

    reply = iface.call("Notify", APP_NAME, 0, "rewind", title, message, [], {"urgency": urgency}, -1)
    return reply.errorName() == ""



def _install_excepthook(window_getter: Any) -> None:
    """Never die on an exception in a slot: show it and carry on."""
    def hook(etype: type[BaseException], value: BaseException, tb: Any) -> None:
        text = "".join(traceback.format_exception(etype, value, tb))
        sys.stderr.write(text)
        if issubclass(etype, KeyboardInterrupt):
            QApplication.quit()
            return
        try:
            value.__rewind_traceback__ = text  # type: ignore[attr-defined]
            errdlg.show_error(window_getter(), "Something went wrong", value)
        except Exception:  # noqa: BLE001 - the hook itself must never raise
            pass
    sys.excepthook = hook


def preload() -> None:
    """Import what a volume view needs (pyqtgraph, numpy, pytsk3, the engine: about a second)
    once the window is on screen, so that opening the first protection does not pay for it."""
    import rewind.engine.store  # noqa: F401

    from .views import volume  # noqa: F401


def make_app(argv: list[str] | None = None) -> QApplication:
    """The QApplication with our name, icon and palette (reused when one exists, as in tests)."""
    app = QApplication.instance()
    if app is None:
        QGuiApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
        app = QApplication(list(argv) if argv is not None else sys.argv[:1])
    assert isinstance(app, QApplication)
    app.setApplicationName("rewind")
    app.setApplicationDisplayName(APP_NAME)
    app.setOrganizationName(ORG)
    app.setDesktopFileName("rewind")
    app.setWindowIcon(app_icon())
    mode = QSettings(ORG, "console").value("theme", "auto")
    apply_theme(app, str(mode) if mode in ("auto", "light", "dark") else "auto")
    return app


def main(argv: list[str] | None = None) -> int:
    """Open the console; returns the exit status. argv: optional store folders to open, or --demo."""
    t0 = time.perf_counter()
    args = list(sys.argv[1:] if argv is None else argv)
    app = make_app([sys.argv[0] if sys.argv else "rewind"])
    window = MainWindow()
    _install_excepthook(lambda: window)
    window.show()
    QTimer.singleShot(200, preload)
    for a in args:
        if a == "--demo":
            window.open_demo()
        elif not a.startswith("-") and not Path(a).is_dir():  # a disk image: offer to protect it
            QTimer.singleShot(0, window, lambda a=a: window.protect_image(a))
        elif not a.startswith("-"):
            window.open_store(a)
    if os.environ.get("REWIND_STARTUP_TIMING"):
        QTimer.singleShot(0, lambda: print(f"window shown in {time.perf_counter() - t0:.3f} s", flush=True))
    rc = int(app.exec())
    # tear down while the QApplication still exists, in this order, instead of leaving the window
    # (held by the excepthook) and the views' pending deleteLater() to the interpreter's exit
    sys.excepthook = sys.__excepthook__
    window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
