"""Medium defects met by a new user (issue 15, items 5-10), each driven through the real widgets:
a click in a thinned stretch of the timeline, closing the upper of two protections, the history
folder that cannot be made, the dark theme switched live, and quitting while an export runs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import shot, wait_until
from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QFileDialog

BS = 4096


def menu_action(window: Any, menu: str, text: str) -> Any:
    """The real QAction in the menu bar (labels compared without their & accelerators)."""
    for top in window.menuBar().actions():
        if top.text().replace("&", "") == menu:
            for a in top.menu().actions():
                if a.text().replace("&", "") == text:
                    return a
    raise AssertionError(f"no {menu} > {text} in the menu bar")


def small_store(tmp: Path, name: str, writes: int = 4, size: int = 1 << 20) -> Path:
    from rewind.engine.store import Store

    d = tmp / name
    d.mkdir()
    with Store.create(d / "disk.img", d / "store", size=size) as s:
        for i in range(writes):
            s.live.write(i * BS, bytes([i + 1]) * BS)
    return d / "store"


def open_view(window: Any, app: Any, store_dir: Path) -> Any:
    view = window.open_store(str(store_dir))
    wait_until(app, lambda: view.snap is not None or view.error is not None, 30, "the store to open")
    assert view.error is None, view.error
    return view


def click_row(qtbot: Any, lst: Any, row: int) -> None:
    rect = lst.visualItemRect(lst.item(row))
    qtbot.mouseClick(lst.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


# -- 6: File > Close this protection on the upper of two ------------------------------------------

def test_close_upper_protection_from_file_menu(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    a = open_view(window, app, small_store(tmp_path, "a"))
    b = open_view(window, app, small_store(tmp_path, "b"))
    click_row(qtbot, window.volume_list, 1)  # the upper one
    assert window.stack.currentWidget() is a
    menu_action(window, "File", "Close this protection").trigger()
    app.processEvents()
    # no IndexError from _on_select (pytest-qt fails the test on an exception in a slot)
    assert window.views == [b]
    assert window.volume_list.count() == 2
    assert window.stack.currentWidget() is window.views[window.volume_list.currentRow() - 1]
    # again with the upper one selected, then quit: no traceback either
    c = open_view(window, app, small_store(tmp_path, "c"))
    click_row(qtbot, window.volume_list, 1)
    assert window.stack.currentWidget() is b
    menu_action(window, "File", "Quit").trigger()
    app.processEvents()
    assert window.views == [] and c.worker._closing


# -- 10: quitting (and the rest of the window) stays reachable while an export runs -----------------

def test_quit_during_export_asks_and_cancels(window: Any, app: Any, tmp_path: Path, qtbot: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from rewind.app.dialogs import errors as errdlg

    a = open_view(window, app, small_store(tmp_path, "a"))
    b = open_view(window, app, small_store(tmp_path, "b", writes=64, size=16 << 20))  # 4 export chunks
    first, proceed = threading.Event(), threading.Event()  # proceed is never set: only a cancel ends the hold

    def hold_at_first_event(kind: str, ev: Any) -> None:  # the job thread (direct connection)
        if not first.is_set():
            first.set()
            end = time.monotonic() + 20
            while time.monotonic() < end and not b.worker._cancel_requested:  # until quit cancels it
                proceed.wait(0.01)

    b.worker.jobProgress.connect(hold_at_first_event, Qt.ConnectionType.DirectConnection)
    asked: list[str] = []
    replies = [1, 0]  # "Keep running" to Ctrl+Q, then "Stop and quit" to the close button

    def ask(parent: Any, title: str, *args: Any, **kw: Any) -> int:
        asked.append(title)
        return replies.pop(0)

    monkeypatch.setattr(errdlg, "ask", ask)
    out = tmp_path / "exports"
    out.mkdir()
    # the name a person would type into the save dialog
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out / "b.img"), ""))
    click_row(qtbot, window.volume_list, 2)
    wait_until(app, lambda: b.preview is not None, 10, "the preview of now")
    menu_action(window, "Volume", "Export this point...").trigger()
    wait_until(app, first.is_set, 20, "the export to start")
    assert b.job_dialog.isVisible()
    # the rest of the window still answers: another protection can be looked at
    assert app.activeModalWidget() is None
    click_row(qtbot, window.volume_list, 1)
    assert window.stack.currentWidget() is a
    # Ctrl+Q (from the job's own window, where the focus is) asks; "Keep running" keeps it all
    qtbot.keyClick(b.job_dialog, Qt.Key.Key_Q, Qt.KeyboardModifier.ControlModifier)
    assert asked == ["Jobs are running"]
    assert window.isVisible() and b.worker.busy
    # the window's close button: "Stop and quit" cancels the export cleanly and quits
    window.close()
    assert asked == ["Jobs are running", "Jobs are running"]
    assert not window.isVisible()
    assert window.views == [] and not b.worker.busy
    assert list(out.iterdir()) == [], "the cancelled export left nothing behind"


# -- 8: a history folder that cannot be made (/proc/foo) --------------------------------------------

def test_protect_into_proc_says_so_in_the_dialog(window: Any, app: Any, tmp_path: Path, qtbot: Any,
                                                 errors: Any) -> None:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QDialogButtonBox
    from rewind.app.dialogs import errors as errdlg
    from rewind.app.dialogs.protect import ProtectDialog

    seen: dict[str, Any] = {}

    def fill_in() -> None:  # runs inside the dialog's exec(), as a person would
        dlg = app.activeModalWidget()
        assert isinstance(dlg, ProtectDialog)
        ok = dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Ok)
        qtbot.keyClicks(dlg.image, str(tmp_path / "new.img"))
        dlg.size_box.selectAll()
        qtbot.keyClicks(dlg.size_box, "4")
        dlg.store.selectAll()
        qtbot.keyClicks(dlg.store, "/proc/foo")
        qtbot.mouseClick(ok, Qt.MouseButton.LeftButton)
        seen["open_after_bad"] = dlg.isVisible()
        seen["message"] = dlg.error_label.text() if dlg.error_label.isVisible() else ""
        shot(dlg, "protect-bad-folder")
        dlg.store.selectAll()
        qtbot.keyClicks(dlg.store, str(tmp_path / "history"))
        qtbot.mouseClick(ok, Qt.MouseButton.LeftButton)
        seen["open_after_good"] = dlg.isVisible()

    QTimer.singleShot(100, fill_in)
    menu_action(window, "File", "Protect a disk image...").trigger()
    assert seen["open_after_bad"], "the dialog stays open to pick another folder"
    msg = seen["message"]
    assert "/proc/foo" in msg and "Pick another" in msg and "missing" not in msg, msg
    assert not Path("/proc/foo").exists()
    assert not seen["open_after_good"]
    view = window.views[-1]
    wait_until(app, lambda: view.snap is not None or view.error is not None, 20, "the protection to start")
    assert view.error is None and (tmp_path / "history" / "store.json").exists()
    # the same folder given without the dialog: one plain error, no traceback under Details
    errors.expect(r"Cannot protect: Cannot create a folder at /proc/foo")
    assert window.protect(str(tmp_path / "other.img"), "/proc/foo", 1 << 20) is None
    box = errdlg.OPEN_DIALOGS[-1]
    assert "/proc/foo" in box.text() and "Pick another" in box.text()
    assert "Traceback" not in (box.detailedText() or "")
    assert len(window.views) == 1


# -- 5: a click in a stretch retention thinned ---------------------------------------------------------

def thinned_store(tmp: Path) -> Path:
    """Two days of writes every 7 minutes, faded by "1h:all,1d:1h,2d:1d": a day kept hourly."""
    from rewind.engine.store import Store

    t = [time.time_ns() - 2 * 86400 * 10**9]
    s = Store.create(tmp / "disk.img", tmp / "store", size=1 << 20, clock=lambda: t[0])
    try:
        s.set_retention(policy="1h:all,1d:1h,2d:1d")
        for i in range(2 * 86400 // 420):
            s.live.write((i % 16) * BS, bytes([i % 251 + 1]) * BS)
            t[0] += 420 * 10**9
        s.live.flush()
        s.fade().run()
    finally:
        s.close()
    return tmp / "store"


def test_click_in_thinned_band_snaps_to_kept_point(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    from rewind.app.format import human_time
    from rewind.engine.errors import PointError

    view = open_view(window, app, thinned_store(tmp_path))
    store = view.worker.link.store
    tl = view.timeline
    wait_until(app, lambda: view.preview is not None, 10, "the preview of now")

    def kept(seq: int) -> bool:
        try:
            store.resolve(seq)
            return True
        except PointError:
            return False

    # a pixel half a day back whose time falls on a merged-away record
    x0 = int(tl.x_of(time.time_ns() - 12 * 3600 * 10**9))
    x = next(x for x in range(x0, x0 + 40) if not kept(view.worker.link.seq_at_time(tl.t_of(x))))
    qtbot.mouseClick(tl, Qt.MouseButton.LeftButton, pos=QPoint(x, int(tl._track().center().y())))
    wait_until(app, lambda: view.preview is not None and view.preview.seq < view.preview.head, 10,
               "the preview of the clicked point")
    p = view.preview
    assert kept(p.seq)
    assert abs(p.time_ns - tl.t_of(x)) <= 3600 * 10**9, "the kept point nearest the click"
    # heading, body (the pane), timeline and arrow keys all on that point
    assert "Cannot read" not in view.preview_pane.header.text()
    assert view.preview_pane.preview.seq == p.seq
    assert f"record {p.seq:,}" in view.preview_pane.header.text()
    assert human_time(p.time_ns, with_date=True) in view.point_label.text()
    assert f"record {p.seq:,}" in view.point_label.text()
    assert tl.seq == p.seq and not tl.at_now
    qtbot.keyClick(tl, Qt.Key.Key_Right)
    wait_until(app, lambda: view.preview.seq != p.seq, 10, "a step right")
    right = view.preview.seq
    assert p.seq < right < p.head and kept(right), "on to the next kept point, not from now"
    assert f"record {right:,}" in view.point_label.text()
    qtbot.keyClick(tl, Qt.Key.Key_Left)
    wait_until(app, lambda: view.preview.seq != right, 10, "a step back")
    assert view.preview.seq == p.seq


# -- 9: View > Dark while running, then back to following the desktop -----------------------------------

def test_dark_theme_live_and_follow_desktop(window: Any, app: Any, qtbot: Any) -> None:
    from PySide6.QtGui import QColor, QPalette
    from rewind.app import theme

    view = window.open_demo(interval=0.03, seed=3)
    wait_until(app, lambda: view.snap is not None, 20, "the demo to open")
    wait_until(app, lambda: view.preview is not None and len(view.preview.files()) >= 4, 30,
               "a preview with files")
    menu_action(window, "View", "Light").trigger()
    app.processEvents()
    menu_action(window, "View", "Dark").trigger()
    app.processEvents()
    wait_until(app, lambda: view.preview_pane.tree.topLevelItemCount() > 0, 10, "the file list")
    shot(window, "theme-dark-live")
    dark = theme.DARK
    assert theme.colors() is dark

    def fg(item: Any) -> QColor:  # what the row is drawn in: its own colour, else the palette's
        brush = item.foreground(0)
        return brush.color() if brush.style() != Qt.BrushStyle.NoBrush else \
            view.preview_pane.tree.palette().color(QPalette.ColorRole.Text)

    items = [view.preview_pane._items[e.path] for e in view.preview.entries if not e.status]
    assert items, "some unchanged rows"
    assert all(fg(it).lightness() > 160 for it in items), "unchanged names readable on dark"
    charts = view.charts
    assert charts.glw.backgroundBrush().color().name() == QColor(dark.background).name()
    axis = charts.rate_plot.getAxis("left")
    assert axis.textPen().color().name() == QColor(dark.text).name()
    assert charts.rate_curve.opts["pen"].color().name() == QColor(dark.rate).name()
    # "Follow the desktop": the offscreen desktop says no scheme and has a light palette
    assert app.styleHints().colorScheme() == Qt.ColorScheme.Unknown
    menu_action(window, "View", "Follow the desktop").trigger()
    app.processEvents()
    assert theme.colors() is theme.LIGHT
    assert charts.glw.backgroundBrush().color().name() == QColor(theme.LIGHT.background).name()
    assert all(fg(it).lightness() < 100 for it in items)


# -- 7: ownership: a closed protection's worker goes at once; long use then quit does not crash -------

def test_closed_protection_frees_its_worker(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    import gc
    import weakref

    from PySide6.QtCore import QCoreApplication, QEvent

    view = open_view(window, app, small_store(tmp_path, "a"))
    wait_until(app, lambda v=view: v.preview is not None, 10, "the preview of now")
    worker = view.worker
    threads = [worker.lane.qthread, worker.preview_lane.qthread, worker.job_lane.qthread]
    for _ in range(20):  # requests still queued when it closes
        qtbot.keyClick(view.timeline, Qt.Key.Key_Left)
    menu_action(window, "File", "Close this protection").trigger()
    assert all(t.isFinished() for t in threads)
    gone_worker, gone_view = weakref.ref(worker), weakref.ref(view)
    del worker, view, threads
    for _ in range(3):
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        app.processEvents()
        gc.collect()
    # freed now, in the GUI thread, not left to the interpreter's exit after the QApplication
    assert gone_view() is None, "the closed view is not kept alive by its worker's connections"
    assert gone_worker() is None, "the worker (and its QThreads) are freed when the view goes"


def test_long_use_then_quit_does_not_crash(tmp_path: Path) -> None:
    """Views opened and closed, themes switched, exports started and cancelled, File > Quit with an
    export running: in a process of its own, so a crash fails this test (exit -11) instead of
    killing pytest."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    r = subprocess.run([sys.executable, "-X", "faulthandler", str(Path(__file__).with_name("quit_stress.py")),
                        str(tmp_path), "3"], capture_output=True, text=True, timeout=240, env=env)
    err = "\n".join(line for line in r.stderr.splitlines()
                    if "propagateSizeHints" not in line and "does not support raise" not in line)
    assert r.returncode == 0, f"exit {r.returncode}\n{err[-3000:]}"
    assert "quit with 0" in r.stdout
    for bad in ("shared QObject was deleted", "Destroyed while thread", "Traceback", "Fatal Python error"):
        assert bad not in err, err[-3000:]


def test_pyside_keeps_bool_refcounts() -> None:
    """The installed PySide6 (pinned below 6.12 in pyproject.toml) does not drop references to
    True/False/None on emit: 6.12.0 on CPython 3.11 aborts this loop with "bool_dealloc". Run
    without rewind.app, whose import would hide the bug, in a process of its own."""
    import subprocess
    import sys

    code = """if True:
        import sys
        from PySide6.QtCore import QCoreApplication, QObject, Qt, QThread, Signal, Slot
        app = QCoreApplication([])
        class O(QObject):
            s = Signal(object)
            b = Signal(bool)
            @Slot(object)
            def slot(self, v):
                return None
        o, r = O(), O()
        t = QThread(); r.moveToThread(t); t.start()
        o.s.connect(r.slot, Qt.ConnectionType.QueuedConnection)
        o.b.connect(lambda v: None)
        before = [sys.getrefcount(x) for x in (True, False, None)]
        for _ in range(20000):
            o.s.emit(1); o.b.emit(True); o.b.emit(False)
        t.quit(); t.wait()
        app.processEvents()
        after = [sys.getrefcount(x) for x in (True, False, None)]
        print([a - b for a, b in zip(after, before)])
    """
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    drift = [int(x) for x in r.stdout.strip().strip("[]").split(",")]
    assert all(abs(d) < 1000 for d in drift), f"reference drift of True/False/None: {drift}"
