"""Issue 15's low defects, as a new user meets them: each test clicks the real widgets (buttons,
menu actions, dialogs answered as a person would) on a real store underneath."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from conftest import wait_until


def _menu_action(window: Any, menu: str, text: str) -> Any:
    """The real QAction of the menu bar's `menu` whose text (without &) starts with `text`."""
    for top in window.menuBar().actions():
        if top.text().replace("&", "") == menu:
            for a in top.menu().actions():
                if a.text().replace("&", "").startswith(text):
                    return a
    raise AssertionError(f"no {menu} > {text} in the menu bar")


def _raw_store(tmp: Path, blocks: int = 64) -> Path:
    from rewind.engine.store import Store

    with Store.create(tmp / "disk.img", tmp / "store", size=4 << 20) as s:
        for i in range(blocks):
            s.live.write(i * 4096, bytes([i % 251 + 1]) * 4096)
        s.mark("filled")
        s.live.flush()
    return tmp / "store"


def _fat_store(tmp: Path, name: str = "store") -> Path:
    """A 16 MiB FAT volume: mark "formatted" (empty), then /hello.txt and /Docs/a.txt written."""
    from pyfatfs.PyFatFS import PyFatBytesIOFS
    from rewind.app.demo import LiveFile, copy_in, make_fat_image
    from rewind.engine.store import Store

    store_dir = tmp / name
    with tempfile.TemporaryDirectory() as t:
        img = Path(t) / "fat.img"
        make_fat_image(img, 16 << 20)
        with Store.create(tmp / f"{name}-disk.img", store_dir, size=16 << 20) as s:
            copy_in(s.live, img)
            s.mark("formatted")
            fs = PyFatBytesIOFS(LiveFile(s.live))
            with fs.openbin("/hello.txt", "w") as f:
                f.write(b"hello\n")
            fs.makedir("/Docs")
            with fs.openbin("/Docs/a.txt", "w") as f:
                f.write(b"a file in a folder\n")
            fs.close()
            s.mark("written")
            s.live.flush()
    return store_dir


def _open(window: Any, app: Any, store: Path) -> Any:
    view = window.open_store(str(store))
    wait_until(app, lambda: view.snap is not None and view.preview is not None, 20, "the store to open")
    return view


# -- 19: menu items that need a protection are greyed out without one ------------------------------------
def test_volume_menu_disabled_without_protection(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    from PySide6.QtCore import Qt

    needs = [("Volume", "Mark now"), ("Volume", "Export this point"), ("Volume", "Rewind to this point"),
             ("Volume", "Verify"), ("File", "Close this protection")]
    for menu, text in needs:
        assert not _menu_action(window, menu, text).isEnabled(), f"{menu} > {text} enabled with nothing selected"
    view = _open(window, app, _raw_store(tmp_path))
    for menu, text in needs:
        assert _menu_action(window, menu, text).isEnabled(), f"{menu} > {text} disabled with a protection open"
    # back to Welcome by clicking it in the list: greyed out again
    lst = window.volume_list
    qtbot.mouseClick(lst.viewport(), Qt.MouseButton.LeftButton, pos=lst.visualItemRect(lst.item(0)).center())
    assert window.current_view() is None
    for menu, text in needs:
        assert not _menu_action(window, menu, text).isEnabled(), f"{menu} > {text} enabled on Welcome"
    # File > Close on the protection closes it; the items grey out again
    lst.setCurrentRow(1)
    _menu_action(window, "File", "Close this protection").trigger()
    assert window.views == [] and view not in window.views
    for menu, text in needs:
        assert not _menu_action(window, menu, text).isEnabled()


# -- 16: the fade's result is read whole, not cut off ----------------------------------------------------
def _shows_whole(label: Any) -> bool:
    """The label's text is not cut: it fits on one line, or it wraps into the height it has."""
    fm = label.fontMetrics()
    width = label.contentsRect().width()
    if fm.horizontalAdvance(label.text()) <= width:
        return True
    return bool(label.wordWrap()) and label.heightForWidth(label.width()) <= label.height()


def test_fade_result_fits(window: Any, app: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from rewind.engine.journal.segments import Journal
    from test_gui_retention import agree_to_fade, make_history

    monkeypatch.setattr(Journal, "SEGMENT_LIMIT", 64 << 10)
    store_dir, _marks = make_history(tmp_path)
    window.resize(900, 700)  # a laptop-sized window
    view = _open(window, app, store_dir)
    view.show_retention()
    view.retention_page.fade_button.click()
    agree_to_fade(app, view)
    dlg = wait_until(app, lambda: view.job_dialog if view.job_dialog and view.job_dialog.finished_state else None,
                     60, "the fade to finish")
    assert dlg.finished_state == "done", dlg.detail.text()
    app.processEvents()
    assert "points merged away or faded" in dlg.detail.text()
    assert _shows_whole(dlg.detail), (dlg.detail.text(), dlg.detail.width())
    dlg.accept()
    wait_until(app, lambda: view.info_bar.isVisible(), 5, "the fade's line in the info bar")
    app.processEvents()
    label = view.info_bar.label
    assert "points merged away or faded" in label.text()
    assert _shows_whole(label), (label.text(), label.width())
    assert window.width() <= 900, "the window grew to fit the line"


def _go_to_mark(view: Any, app: Any, qtbot: Any, name: str) -> None:
    """PageUp on the timeline, mark to mark, until the point is mark `name` (as a person would)."""
    from PySide6.QtCore import Qt

    m = next(m for m in view.snap.marks if m.name == name)
    for _ in range(6):
        if view.preview is not None and view.preview.seq == m.seq and not view.timeline.at_now:
            return
        qtbot.keyClick(view.timeline, Qt.Key.Key_PageUp)
        wait_until(app, lambda: view.preview.seq <= view.timeline.seq or view.preview.seq == m.seq, 10,
                   "the preview after PageUp")
        wait_until(app, lambda: view.preview.seq == view.timeline.seq, 10, "the preview at the step")
    assert view.preview.seq == m.seq, f"PageUp never reached mark {name}"


def _click_row(qtbot: Any, tree: Any, path: str, pane: Any) -> None:
    from PySide6.QtCore import Qt

    item = pane._items[path]
    tree.scrollToItem(item)
    qtbot.mouseClick(tree.viewport(), Qt.MouseButton.LeftButton, pos=tree.visualItemRect(item).center())


# -- 11: a point whose filesystem is gone now says so, not "0 added, 0 changed, 0 deleted" ---------------
def test_wiped_filesystem_is_said_plainly(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    from rewind.engine.store import Store

    store_dir = _fat_store(tmp_path)
    with Store.open(store_dir) as s:
        s.live.write(0, bytes(64 << 10))  # wipefs: the boot sector and the FAT are gone
        s.live.flush()
    view = _open(window, app, store_dir)
    assert view.preview.fs_type is None, "no filesystem now"
    _go_to_mark(view, app, qtbot, "written")
    header = view.preview_pane.header.text()
    assert view.preview.fs_type, header  # the point still has its filesystem
    assert "0 deleted" not in header and "0 added, 0 changed" not in header, header
    assert "none is recognised now" in header and "2 files" in header, header
    assert view.preview_pane.listed_files().keys() >= {"/hello.txt", "/Docs/a.txt"}
    statuses = {e.path: e.status for e in view.preview.entries if not e.is_dir}
    assert set(statuses.values()) == {"deleted"}, statuses
    assert view.preview_pane._items["/hello.txt"].text(3) == "deleted since"


# -- 13: the preview's file header follows what is selected and shown ------------------------------------
def test_preview_header_never_stale(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    view = _open(window, app, _fat_store(tmp_path))
    pane = view.preview_pane
    wait_until(app, lambda: "/hello.txt" in pane._items, 10, "the file tree")
    _click_row(qtbot, pane.tree, "/hello.txt", pane)
    wait_until(app, lambda: pane.text.toPlainText() == "hello\n", 10, "the file's text")
    assert "/hello.txt" in pane.file_label.text()
    # a folder: the header says the folder, not the last file
    _click_row(qtbot, pane.tree, "/Docs", pane)
    assert "hello.txt" not in pane.file_label.text(), pane.file_label.text()
    assert "/Docs" in pane.file_label.text() and not pane.save_button.isEnabled()

    # at "formatted" the file is added since; rewinding there leaves no such file now
    _go_to_mark(view, app, qtbot, "formatted")
    _click_row(qtbot, pane.tree, "/hello.txt", pane)
    assert "now (added after this point)" in pane.file_label.text()
    view.rewind_button.click()
    dlg = wait_until(app, lambda: view.rewind_dialog, 20, "the rewind confirmation")
    dlg.rewind_button.click()
    wait_until(app, lambda: view.job_dialog is not None and view.job_dialog.finished_state == "done", 30,
               "the rewind")
    wait_until(app, lambda: view.timeline.at_now and view.preview.seq == view.preview.head
               and "/hello.txt" not in pane._items, 20, "the preview of now after the rewind")
    assert pane.placeholder.text() == "That file does not exist at this point."
    assert "added after this point" not in pane.file_label.text(), pane.file_label.text()
    assert "hello.txt" not in pane.file_label.text(), pane.file_label.text()
    assert not pane.save_button.isEnabled()


# -- 15: a mark name that is taken is asked again, saying so ---------------------------------------------
def test_duplicate_mark_name_asks_again(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QDialogButtonBox, QInputDialog, QLineEdit
    from rewind.app.dialogs import errors as errdlg

    view = _open(window, app, _raw_store(tmp_path))
    labels: list[str] = []
    names = ["filled", "filled again"]  # what the person types, one per time they are asked

    def answer() -> None:
        dlg = next((d for d in view.findChildren(QInputDialog) if d.isVisible()), None)
        if dlg is None or len(labels) >= len(names) or (labels and dlg.labelText() == labels[-1]):
            QTimer.singleShot(30, answer)
            return
        labels.append(dlg.labelText())
        line = dlg.findChild(QLineEdit)
        line.selectAll()
        qtbot.keyClicks(line, names[len(labels) - 1])
        dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Ok).click()
        if len(labels) < len(names):
            QTimer.singleShot(30, answer)

    QTimer.singleShot(30, answer)
    _menu_action(window, "Volume", "Mark now").trigger()
    assert len(labels) == 2, labels
    assert "“filled” exists" in labels[1], labels
    wait_until(app, lambda: any(m.name == "filled again" for m in view.snap.marks), 10, "the new mark")
    app.processEvents()
    said = [b.text() + " " + b.informativeText() for b in errdlg.OPEN_DIALOGS]
    assert not said, said


# -- 14: the point stays where it was let go; heading, body and status bar agree -------------------------
def test_timeline_release_keeps_point_and_heading_keeps_up(window: Any, app: Any, qtbot: Any) -> None:
    import re
    import time

    from PySide6.QtCore import QPoint, Qt

    view = window.open_demo(interval=0.03, seed=7)
    wait_until(app, lambda: view.snap is not None and view.snap.head > 150, 60, "the demo's writes")
    # at now, the heading says the record the status bar says, every second
    for _ in range(4):
        with qtbot.waitSignal(view.statusChanged, timeout=5000):
            pass
        want = f"record {view.snap.head:,}"
        assert want in window.st_writes.text()
        assert want in view.point_label.text(), (view.point_label.text(), window.st_writes.text())

    # drag to the middle, wait there while the demo writes on, let go at the same place
    tl = view.timeline
    x, y = tl.width() // 2, 14 + 17
    qtbot.mousePress(tl, Qt.MouseButton.LeftButton, pos=QPoint(x, y))
    qtbot.mouseMove(tl, QPoint(x + 1, y))
    qtbot.mouseMove(tl, QPoint(x, y))
    wait_until(app, lambda: view.preview is not None and not tl.at_now and view.preview.seq == tl.seq
               and abs(view.preview.time_ns - tl.t_point) < 5 * 10**9 and view.worker.preview_gen == view.shown_gen,
               10, "the preview under the handle")
    held = view.preview.seq
    end = time.monotonic() + 2.5
    while time.monotonic() < end:  # snapshots come: now moves on, the scale under the handle shifts
        app.processEvents()
        time.sleep(0.02)
    qtbot.mouseRelease(tl, Qt.MouseButton.LeftButton, pos=QPoint(x, y))
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)
    assert view.preview.seq == held, f"the record moved by itself after release: {held:,} -> {view.preview.seq:,}"
    assert f"record {held:,}" in view.point_label.text(), view.point_label.text()
    # heading and body say the same time
    stamp = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", view.point_label.text())
    assert stamp, view.point_label.text()
    if view.preview.fs_type is not None:
        assert stamp.group(0) in view.preview_pane.header.text(), (view.point_label.text(),
                                                                   view.preview_pane.header.text())


# -- 12: the protect and open dialogs check inside themselves, in plain words; no dead entries -----------
def _answer_dialog(app: Any, find: Any, steps: list[Any]) -> list[Any]:
    """Run steps(dlg) one after another on the modal dialog `find()` returns, while it is open."""
    from PySide6.QtCore import QTimer

    done: list[Any] = []

    def go() -> None:
        dlg = find()
        if dlg is None or not dlg.isVisible():
            QTimer.singleShot(30, go)
            return
        try:
            done.append(steps[len(done)](dlg))
        except BaseException as e:  # a failed step must not leave the modal dialog waiting forever
            done.append(e)
            dlg.reject()
            raise
        if len(done) < len(steps) and dlg.isVisible():
            QTimer.singleShot(30, go)

    QTimer.singleShot(30, go)
    return done


def test_protect_dialog_checks_inside(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QDialogButtonBox
    from rewind.app.dialogs.protect import ProtectDialog

    image = tmp_path / "new-disk.img"
    store = tmp_path / "history"
    seen: dict[str, Any] = {}

    def type_missing_image(dlg: Any) -> None:
        qtbot.keyClicks(dlg.image, str(image))
        dlg.store.selectAll()
        qtbot.keyClicks(dlg.store, str(store))
        ok = dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Ok)
        seen["problem"] = dlg.image_problem.text() if dlg.image_problem.isVisible() else ""
        seen["ok_enabled"] = ok.isEnabled()
        ok.click()  # a person clicks Protect anyway
        seen["still_open"] = dlg.isVisible()

    def set_size_and_protect(dlg: Any) -> None:
        dlg.size_box.selectAll()
        qtbot.keyClicks(dlg.size_box, "4")
        qtbot.keyClick(dlg.size_box, Qt.Key.Key_Tab)
        seen["problem_after"] = dlg.image_problem.isVisible()
        dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Ok).click()

    done = _answer_dialog(app, lambda: next((d for d in window.findChildren(ProtectDialog) if d.isVisible()), None),
                          [type_missing_image, set_size_and_protect])
    _menu_action(window, "File", "Protect a disk image").trigger()
    assert len(done) == 2, seen
    assert "set its size" in seen["problem"] and "--size" not in seen["problem"], seen
    assert seen["still_open"] and not seen["ok_enabled"], seen
    assert not seen["problem_after"]
    view = window.views[-1]
    wait_until(app, lambda: view.snap is not None or view.error is not None, 20, "the new protection")
    assert view.error is None and image.stat().st_size == 4 << 20
    assert len(window.views) == 1


def test_open_dialog_checks_inside_and_no_dead_entries(window: Any, app: Any, tmp_path: Path,
                                                       qtbot: Any, errors: Any) -> None:
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QDialogButtonBox, QFileDialog, QLineEdit
    from rewind.app.dialogs import errors as errdlg

    store = _raw_store(tmp_path)
    not_history = tmp_path / "photos"
    not_history.mkdir()
    seen: dict[str, Any] = {}

    def choose(dlg: Any, folder: Path) -> None:
        line = dlg.findChild(QLineEdit, "fileNameEdit")
        line.setText(str(folder))  # pasted: typing opens the completer's popup, which eats the click
        box = dlg.findChild(QDialogButtonBox)
        btn = next(b for b in box.buttons() if box.buttonRole(b) == QDialogButtonBox.ButtonRole.AcceptRole)
        qtbot.mouseClick(btn, Qt.MouseButton.LeftButton)

    def wrong(dlg: Any) -> None:
        choose(dlg, not_history)
        seen["open_after_wrong"] = dlg.isVisible()
        problem = dlg.findChild(type(dlg.problem), "problem") if hasattr(dlg, "problem") else None
        seen["said"] = problem.text() if problem is not None and problem.isVisible() else ""

    def inside(dlg: Any) -> None:
        choose(dlg, store / "journal")
        seen["said_inside"] = dlg.problem.text()

    def right(dlg: Any) -> None:
        choose(dlg, store)

    done = _answer_dialog(app, lambda: next((d for d in window.findChildren(QFileDialog) if d.isVisible()), None),
                          [wrong, inside, right])
    _menu_action(window, "File", "Open a protection").trigger()
    assert seen.get("open_after_wrong"), f"the dialog closed on a folder with no history: {window.views}"
    assert "holds no Rewind history" in seen["said"] and "store.json" not in seen["said"], seen
    assert "inside the history folder" in seen["said_inside"], seen
    assert len(done) == 3
    view = window.views[-1]
    wait_until(app, lambda: view.snap is not None, 20, "the protection to open")
    assert len(window.views) == 1

    # a protection that cannot open (its image is gone): one error, and once it is read the
    # entry leaves the list instead of staying as "Failed to open"
    (tmp_path / "disk.img").rename(tmp_path / "moved.img")
    errors.expect(r"Cannot open the protection: primary volume .* is missing")
    window.close_view(view)
    bad = window.open_store(str(store))
    box = wait_until(app, lambda: errdlg.OPEN_DIALOGS[-1] if errdlg.OPEN_DIALOGS else None, 20, "the error")
    assert bad.state == "Failed to open"
    qtbot.mouseClick(box.button(box.StandardButton.Ok), Qt.MouseButton.LeftButton)
    wait_until(app, lambda: window.views == [], 5, "the failed entry to leave the list")
    assert window.volume_list.count() == 1  # only Welcome


# -- 17: `rewind PATH` (the .desktop entry's Exec=rewind %F) opens the console with it --------------------
def test_rewind_path_opens_console(app: Any, isolated: Path, tmp_path: Path, monkeypatch: Any) -> None:
    import sys
    import time

    from PySide6.QtCore import QTimer
    from rewind.app.dialogs.protect import ProtectDialog
    from rewind.app.main import MainWindow
    from rewind.engine import cli

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the console installs its own
    store = _raw_store(tmp_path)
    image = tmp_path / "other.img"
    image.write_bytes(bytes(1 << 20))
    seen: dict[str, Any] = {}

    def run(args: list[str], look: Any) -> int:
        end = time.monotonic() + 30

        def check() -> None:
            wins = [w for w in app.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
            if wins and (look(wins[-1]) or time.monotonic() > end):
                for d in wins[-1].findChildren(ProtectDialog):
                    d.reject()
                QTimer.singleShot(0, wins[-1].quit)
                return
            if time.monotonic() > end:
                app.quit()
                return
            QTimer.singleShot(50, check)

        QTimer.singleShot(50, check)
        return cli.main(args)

    def store_open(w: Any) -> bool:
        if w.views and w.views[0].snap is not None:
            seen["store"] = str(w.views[0].worker.link.dir)
            return True
        return False

    assert run([str(store)], store_open) == 0
    assert seen.get("store") == str(store.absolute())

    def image_offered(w: Any) -> bool:
        d = next((d for d in w.findChildren(ProtectDialog) if d.isVisible()), None)
        if d is not None:
            seen["image"] = d.image.text()
            return True
        return False

    assert run([str(image)], image_offered) == 0
    assert seen.get("image") == str(image.absolute())


# -- 18: when the attached `rewind serve` stops, say so truly and offer to take the volume over ----------
def test_serve_stopped_offers_take_over(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    import signal

    from helpers import rewind_serve
    from PySide6.QtCore import Qt
    from test_gui_attach import _make_store

    store_dir = _make_store(tmp_path)
    with rewind_serve(store_dir, tmp_path / "nbd.sock") as proc:
        view = window.open_store(str(store_dir))
        wait_until(app, lambda: view.snap is not None and view.preview is not None, 20, "the attached store")
        assert view.snap.remote and not view.rewind_button.isEnabled()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    wait_until(app, lambda: view.state == "Lost touch with serve", 15, "the console to notice")
    said = " ".join(n[1] for n in window.notifications if "Protection stopped" in n[0])
    assert said and "in use by another process" not in said, said
    assert view.info_bar.isVisible() and view.info_bar.button.text() == "Take over"
    qtbot.mouseClick(view.info_bar.button, Qt.MouseButton.LeftButton)
    wait_until(app, lambda: not view.snap.remote, 20, "the store opened by the console itself")
    wait_until(app, lambda: view.state == "Protecting" and view.rewind_button.isEnabled(), 10, "the actions back")
    assert view.serve_button.isEnabled()
    assert window.st_front.text() == "NBD: not served"
    assert view.worker.link is not None and not view.worker.link.remote


# -- 20: the demo says why its history grows and when it slows down on purpose ---------------------------
def test_demo_says_paced_and_why_history_grows(window: Any, app: Any) -> None:
    view = window.open_demo(interval=0.05, seed=3)
    wait_until(app, lambda: view.snap is not None and view.snap.demo.get("running"), 60, "the demo to run")
    wait_until(app, lambda: "Every write is kept" in view.subtitle.text(), 5, "the demo's status")
    assert "paced to keep history small" in view.subtitle.text()  # says what is coming
    assert view.subtitle.isVisible()
    # two minutes on (the workload's busy stretch is shortened here, not the clock)
    view.worker.demo.busy_s = 0
    wait_until(app, lambda: view.snap.demo.get("paced"), 10, "the demo to slow down")
    wait_until(app, lambda: "Demo: paced to keep history small" in view.subtitle.text(), 5, "the paced status")
    assert view.state == "Protecting · demo paced"
    assert window.volume_list.item(1).text().endswith("demo paced")
