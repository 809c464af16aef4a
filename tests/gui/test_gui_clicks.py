"""The console as a person meets it: every toolbar button of the volume view clicked and every
menu action triggered on the real widgets, dialogs answered as a person would (the conftest's
`errors` fixture fails a test on any unexpected error dialog or exception, `no_thread_leaks` on
threads left running). Issue 15, defects 1-4."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import choose_folder, shot, type_and_accept, wait_until, when_modal
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QInputDialog, QMessageBox

BS = 4096


def _small_store(tmp: Path, blocks: int = 32) -> Path:
    from rewind.engine.store import Store

    with Store.create(tmp / "disk.img", tmp / "store", size=2 << 20) as s:
        for i in range(blocks):
            s.live.write(i * BS, bytes([i % 251 + 1]) * BS)
        s.mark("filled", pinned=True)
        for i in range(0, blocks, 2):
            s.live.write(i * BS, b"\xee" * BS)
        s.live.flush()
    return tmp / "store"


def _open(window: Any, app: Any, store_dir: Path) -> Any:
    view = window.open_store(str(store_dir))
    wait_until(app, lambda: view.preview is not None, 30, "the store to open and show now")
    return view


def _click(qtbot: Any, button: Any) -> None:
    """A left click where a person aims: the middle of a button, the box of a check or radio."""
    from PySide6.QtCore import QPoint
    from PySide6.QtWidgets import QCheckBox, QRadioButton

    assert button.isVisible() and button.isEnabled(), button.text()
    if isinstance(button, QCheckBox | QRadioButton):
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton, pos=QPoint(8, button.height() // 2))
    else:
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _button(box: QMessageBox, label: str) -> Any:
    return next(b for b in box.buttons() if b.text().replace("&", "") == label)


def test_mark_now_button_asks_a_name_and_keeps_the_mark(window: Any, app: Any, tmp_path: Path,
                                                          qtbot: Any) -> None:
    """Defect 1: the button's clicked(bool) landed in mark_now(name) ("'bool' object has no
    attribute 'strip'"). A mark made in the console is the person's: kept until removed."""
    view = _open(window, app, _small_store(tmp_path))
    when_modal(app, type_and_accept("before upgrade"), QInputDialog)
    with qtbot.waitSignal(view.worker.marked, timeout=10000) as got:
        _click(qtbot, view.mark_button)
    m = got.args[0]
    assert m.name == "before upgrade" and m.pinned
    wait_until(app, lambda: any(x.name == "before upgrade" for x in view.snap.marks), 10, "the mark in the view")
    # Cancel in the name dialog makes no mark
    when_modal(app, lambda d: d.reject(), QInputDialog)
    _click(qtbot, view.mark_button)
    app.processEvents()
    assert [x.name for x in view.worker.link.marks()] == ["filled", "before upgrade"]


def test_export_button_asks_where_and_writes_the_point(window: Any, app: Any, tmp_path: Path, qtbot: Any,
                                                        files: list[str]) -> None:
    """Defect 2: the button's clicked(bool) landed in export_point(out): "Exporting ... to False"."""
    view = _open(window, app, _small_store(tmp_path))
    view.go_to_seq(view.worker.link.store.resolve("mark:filled"))
    wait_until(app, lambda: view.preview.seq == view.worker.link.store.resolve("mark:filled"), 10, "the mark")
    out = tmp_path / "at-filled.img"
    files.append(str(out))
    _click(qtbot, view.export_button)
    dlg = wait_until(app, lambda: view.job_dialog if view.job_dialog and view.job_dialog.finished_state else None,
                     30, "the export")
    assert dlg.finished_state == "done" and str(out) in dlg.detail.text()
    data = out.read_bytes()
    assert data[:BS] == b"\x01" * BS and data[2 * BS:3 * BS] == b"\x03" * BS
    dlg.accept()
    files.append("")  # Cancel in the file dialog: nothing happens
    _click(qtbot, view.export_button)
    app.processEvents()
    assert view.job_dialog is dlg and not view.worker.busy


def test_rewind_serve_verify_buttons(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    view = _open(window, app, _small_store(tmp_path))
    primary = Path(view.snap.primary)
    seq = view.worker.link.store.resolve("mark:filled")
    view.go_to_seq(seq)
    wait_until(app, lambda: view.preview.seq == seq, 10, "the mark")
    _click(qtbot, view.rewind_button)
    dlg = wait_until(app, lambda: view.rewind_dialog, 20, "the rewind confirmation")
    _click(qtbot, dlg.rewind_button)
    wait_until(app, lambda: view._undo_mark and not view.worker.busy, 30, "the rewind")
    assert primary.read_bytes()[:BS] == b"\x01" * BS
    undo = view._undo_mark
    assert not next(m for m in view.worker.link.marks() if m.name == undo).pinned, "the program's mark"
    _click(qtbot, view.info_bar.button)  # Undo
    wait_until(app, lambda: not view._undo_mark and not view.worker.busy, 30, "the undo")
    assert primary.read_bytes()[:BS] == b"\xee" * BS
    view.job_dialog.accept()

    _click(qtbot, view.serve_button)
    wait_until(app, lambda: view.serve_uri.text().startswith("nbd+unix://"), 20, "the NBD URI")
    _click(qtbot, view.serve_button)  # Stop serving
    wait_until(app, lambda: not view.serve_row.isVisible(), 20, "serving to stop")

    _click(qtbot, view.verify_button)
    dlg = wait_until(app, lambda: view.job_dialog if view.job_dialog.finished_state else None, 30, "verify")
    assert dlg.finished_state == "done", dlg.detail.text()
    dlg.accept()


def _menu_actions(window: Any) -> dict[str, Any]:
    """Every action of the menu bar as "Menu/Item" (accelerator ampersands dropped)."""
    out: dict[str, Any] = {}
    for top in window.menuBar().actions():
        menu = top.menu()
        for a in menu.actions():
            if not a.isSeparator():
                out[f"{top.text().replace('&', '')}/{a.text().replace('&', '')}"] = a
    return out


def test_every_menu_action(window: Any, app: Any, tmp_path: Path, qtbot: Any, files: list[str]) -> None:
    """Each menu item triggered as a person would pick it, its dialogs answered."""
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QDialogButtonBox
    from rewind.app.dialogs import errors as errdlg
    from rewind.app.dialogs.protect import ProtectDialog

    store = _small_store(tmp_path)
    acts = _menu_actions(window)
    done: set[str] = set()

    def trigger(name: str) -> None:
        acts[name].trigger()
        done.add(name)

    from rewind.app.dialogs.protect import OpenDialog

    when_modal(app, lambda d: choose_folder(d, store), OpenDialog)
    trigger("File/Open a protection...")
    view = wait_until(app, lambda: window.current_view() if window.current_view() and
                      window.current_view().preview is not None else None, 30, "the protection to open")
    when_modal(app, type_and_accept("from the menu"), QInputDialog)
    trigger("Volume/Mark now")
    wait_until(app, lambda: any(m.name == "from the menu" and m.pinned for m in view.worker.link.marks()), 10,
               "the menu's mark")
    out = tmp_path / "now.img"
    files.append(str(out))
    trigger("Volume/Export this point...")
    dlg = wait_until(app, lambda: view.job_dialog if view.job_dialog and view.job_dialog.finished_state else None,
                     30, "the export")
    assert dlg.finished_state == "done" and out.stat().st_size == 2 << 20
    dlg.accept()
    view.go_to_seq(view.worker.link.store.resolve("mark:filled"))
    wait_until(app, lambda: view.preview.seq == view.worker.link.store.resolve("mark:filled"), 10, "the mark")
    trigger("Volume/Rewind to this point...")
    rd = wait_until(app, lambda: view.rewind_dialog, 20, "the rewind confirmation")
    _click(qtbot, rd.buttons.button(QDialogButtonBox.StandardButton.Cancel))  # a person changes their mind
    assert not view.worker.busy and Path(view.snap.primary).read_bytes()[:BS] == b"\xee" * BS
    trigger("Volume/Verify")
    dlg = wait_until(app, lambda: view.job_dialog if view.job_dialog.finished_state else None, 30, "verify")
    assert dlg.finished_state == "done"
    dlg.accept()
    for name in [n for n in acts if n.startswith("View/")]:  # the theme changes at once, no message
        trigger(name)
        assert window.settings.value("theme") is not None
    for name in ["Help/About Rewind"]:
        before = len(errdlg.OPEN_DIALOGS)
        trigger(name)
        box = wait_until(app, lambda b=before: errdlg.OPEN_DIALOGS[-1] if len(errdlg.OPEN_DIALOGS) > b else None,
                         5, f"{name}'s message")
        box.done(0)

    def protect(dlg: Any) -> None:
        QTest.keyClicks(dlg.image, str(tmp_path / "new.img"))
        dlg.store.selectAll()
        QTest.keyClicks(dlg.store, str(tmp_path / "new-history"))
        dlg.size_box.setValue(4)
        box = dlg.findChild(QDialogButtonBox)
        _click(qtbot, box.button(QDialogButtonBox.StandardButton.Ok))

    when_modal(app, protect, ProtectDialog)
    trigger("File/Protect a disk image...")
    new = wait_until(app, lambda: len(window.views) == 2 and window.views[1].snap is not None, 30, "the new protection")
    assert new and (tmp_path / "new-history" / "store.json").exists()
    trigger("File/Try the demo")
    demo = wait_until(app, lambda: window.views[2] if len(window.views) == 3 and window.views[2].snap else None, 30,
                      "the demo")
    assert demo.demo and window.current_view() is demo
    trigger("File/Close this protection")
    assert len(window.views) == 2 and demo not in window.views
    trigger("File/Quit")
    app.processEvents()
    assert not window.isVisible() and window.views == []
    assert done == set(acts), f"untested menu actions: {set(acts) - done}"


def _demo_marks(view: Any) -> list[Any]:
    return [m for m in view.worker.link.marks() if m.name.startswith("demo-")]


def test_demo_pause_then_resume_keeps_going(window: Any, app: Any, qtbot: Any) -> None:
    """Defect 3: Resume restarted the workload's mark numbering, so within seconds it ran into
    "a mark named 'demo-1-…' exists" and the view turned into "Failed to open"."""
    view = window.open_demo(interval=0.02, seed=3)
    wait_until(app, lambda: view.snap is not None, 30, "the demo to open")
    wait_until(app, lambda: len(_demo_marks(view)) >= 1, 40, "the demo's first mark")
    _click(qtbot, view.demo_button)  # Pause demo
    wait_until(app, lambda: view.demo_button.text() == "Resume demo", 15, "the demo to pause")
    before = len(_demo_marks(view))
    _click(qtbot, view.demo_button)  # Resume demo
    wait_until(app, lambda: len(_demo_marks(view)) >= before + 2 or view.error is not None, 60,
               "two more marks from the resumed demo")
    assert view.error is None and view.pages.currentIndex() == 1, view.message.text()
    marks = _demo_marks(view)
    assert [int(m.name.split("-")[1]) for m in marks] == list(range(1, len(marks) + 1))
    assert not any(m.pinned for m in marks), "the demo's marks follow retention"
    assert view.state.startswith("Protecting")
    _click(qtbot, view.demo_button)
    wait_until(app, lambda: not view.worker.demo_running, 15, "the demo to pause")


def test_failing_demo_step_keeps_the_history_on_screen(window: Any, app: Any, qtbot: Any, errors: Any) -> None:
    """Defect 3: a demo step that fails (here: the journal's space limit says refuse new writes)
    stops the workload and says so; the history stays on screen, not "Failed to open"."""
    errors.expect("The demo stopped")
    view = window.open_demo(interval=0.02, seed=5)
    wait_until(app, lambda: view.snap is not None and view.worker.demo_running, 30, "the demo to run")
    view.show_retention()
    page = view.retention_page
    _click(qtbot, page.limit_check)
    page.limit_edit.selectAll()
    qtbot.keyClicks(page.limit_edit, "1M")
    _click(qtbot, page.refuse_radio)
    _click(qtbot, page.apply_button)
    wait_until(app, lambda: not view.worker.demo_running, 30, "the refused write to stop the demo")
    wait_until(app, lambda: any(n[0] == "Demo workload stopped" for n in window.notifications), 10, "the notice")
    app.processEvents()
    assert view.error is None and view.state != "Failed to open"
    assert view.pages.currentIndex() == 1 and view.snap is not None
    wait_until(app, lambda: view.demo_button.text() == "Resume demo", 10, "the demo button to offer Resume")


class _Clock:
    def __init__(self, days: float) -> None:
        self.t = time.time_ns() - int(days * 86400 * 10**9)

    def __call__(self) -> int:
        return self.t


def _old_history(tmp: Path) -> Path:
    """Three days of writes (one every 20 minutes) ending now, with a person's mark and two the
    program made, all two days old; the policy keeps every write for an hour, hourly for a day."""
    from rewind.engine.store import Store

    clock = _Clock(3)
    with Store.create(tmp / "disk.img", tmp / "store", size=1 << 20, clock=clock) as s:
        s.set_retention(policy="1h:all,1d:1h")
        n = 3 * 72
        for i in range(n):
            s.live.write((i % 16) * BS, bytes([i % 251 + 1]) * BS)
            if i == 20:
                s.mark("holiday", pinned=True)  # as `rewind mark` makes it
                s.mark("before-rewind-1")
            if i == 24:
                s.mark("demo-1-5-files")
            clock.t += 1200 * 10**9
        s.live.flush()
    return tmp / "store"


def test_fade_now_asks_first_and_keeps_a_persons_marks(window: Any, app: Any, tmp_path: Path,
                                                       qtbot: Any) -> None:
    """Defect 4: Fade now ran without asking and deleted the person's marks, which the "what will
    be kept" preview had drawn as kept. Now it says what goes (points, the program's marks, the
    oldest moment that stays) with Cancel as the default; the person's marks are kept."""
    view = _open(window, app, _old_history(tmp_path))
    store = view.worker.link.store
    when_modal(app, type_and_accept("mine"), QInputDialog)
    _click(qtbot, view.mark_button)
    wait_until(app, lambda: any(m.name == "mine" for m in view.snap.marks), 10, "the console's mark")
    view.tabs.setCurrentIndex(2)  # Marks
    page = view.marks_page
    wait_until(app, lambda: page.table.rowCount() == 4, 10, "the marks list")
    rows = {page.table.item(r, 0).text(): page.table.item(r, 3).text() for r in range(4)}
    assert rows["mine"].startswith("Kept until") and rows["holiday"].startswith("Kept until")
    assert "retention" in rows["before-rewind-1"] and "retention" in rows["demo-1-5-files"]
    page.select("demo-1-5-files")
    shot(window, "marks-list")

    view.show_retention()
    rp = view.retention_page
    wait_until(app, lambda: rp.preview is not None and rp.preview.points_removed is not None, 20, "the preview")
    exact = store.fade_preview()
    assert sorted(rp.preview.marks_fading) == sorted(exact["marks"]) == ["before-rewind-1", "demo-1-5-files"]
    drawn = {m.name for m in rp.timeline.marks}
    assert drawn == {"holiday", "mine"}, "the preview draws exactly the marks the fade keeps"
    assert "holiday" in rp.summary.text() and "demo-1-5-files" in rp.summary.text()

    horizon = store.horizon
    _click(qtbot, rp.fade_button)
    dlg = wait_until(app, lambda: view.fade_dialog, 20, "the fade confirmation")
    assert dlg.defaultButton() is dlg.cancel_button and dlg.escapeButton() is dlg.cancel_button
    text = dlg.text() + " " + dlg.informativeText()
    assert f"removes {exact['points']:,} points" in text and "demo-1-5-files" in text and "before-rewind-1" in text
    assert "oldest moment that stays" in text and "holiday" in text and "mine" in text
    shot(window, "fade-confirm", dialog=dlg)
    _click(qtbot, dlg.cancel_button)
    app.processEvents()
    assert view.fade_dialog is None and not view.worker.busy and store.horizon == horizon
    assert len(store.marks()) == 4, "Cancel fades nothing"

    _click(qtbot, rp.fade_button)
    dlg = wait_until(app, lambda: view.fade_dialog, 20, "the fade confirmation")
    _click(qtbot, dlg.fade_button)
    job = wait_until(app, lambda: view.job_dialog if view.job_dialog and view.job_dialog.finished_state else None,
                     60, "the fade")
    assert job.finished_state == "done", job.detail.text()
    job.accept()
    assert sorted(m.name for m in store.marks()) == ["holiday", "mine"]
    assert store.horizon > horizon and store.point_time(store.horizon) == exact["horizon"]["time_ns"]


def test_policy_change_asks_before_it_fades(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    """A shorter policy is applied only once the person has seen what the next fade removes."""
    view = _open(window, app, _old_history(tmp_path))
    store = view.worker.link.store
    view.show_retention()
    rp = view.retention_page
    wait_until(app, lambda: rp.table.rowCount() == 2, 10, "the policy's rows")
    rp.set_row(1, age="6h")
    _click(qtbot, rp.apply_button)
    dlg = wait_until(app, lambda: view.fade_dialog, 20, "the confirmation")
    assert dlg.windowTitle() == "Apply the retention policy?" and dlg.defaultButton() is dlg.cancel_button
    assert "holiday" in dlg.informativeText() and "demo-1-5-files" in dlg.text()
    _click(qtbot, dlg.cancel_button)
    app.processEvents()
    assert store.retention()["policy"] == "1h:all,1d:1h"
    _click(qtbot, rp.apply_button)
    dlg = wait_until(app, lambda: view.fade_dialog, 20, "the confirmation")
    _click(qtbot, dlg.fade_button)
    wait_until(app, lambda: store.retention()["policy"] == "1h:all,6h:1h", 10, "the new policy")


def test_marks_list_go_rename_remove_keep(window: Any, app: Any, tmp_path: Path, qtbot: Any,
                                          answers: list[int]) -> None:
    view = _open(window, app, _old_history(tmp_path))
    store = view.worker.link.store
    view.tabs.setCurrentIndex(2)
    page = view.marks_page
    wait_until(app, lambda: page.table.rowCount() == 3, 10, "the marks list")
    assert not page.go_button.isEnabled()
    page.select("holiday")
    _click(qtbot, page.go_button)
    seq = store.resolve("mark:holiday")
    wait_until(app, lambda: view.tabs.currentIndex() == 0 and view.preview.seq == seq, 10, "the point of the mark")
    assert "holiday" in view.point_label.text()

    view.tabs.setCurrentIndex(2)
    page.select("holiday")
    when_modal(app, type_and_accept("summer holiday"), QInputDialog)
    _click(qtbot, page.rename_button)
    wait_until(app, lambda: any(m.name == "summer holiday" for m in view.snap.marks), 10, "the renamed mark")
    m = next(m for m in store.marks() if m.name == "summer holiday")
    assert m.seq == seq and m.pinned and "holiday" not in {x.name for x in store.marks()}

    page.select("demo-1-5-files")
    assert page.keep_button.isEnabled()
    _click(qtbot, page.keep_button)
    wait_until(app, lambda: next(m for m in view.snap.marks if m.name == "demo-1-5-files").pinned, 10, "kept")
    page.select("demo-1-5-files")
    assert not page.keep_button.isEnabled()

    page.select("before-rewind-1")
    answers[:] = [1]  # Cancel
    _click(qtbot, page.remove_button)
    app.processEvents()
    assert any(m.name == "before-rewind-1" for m in store.marks())
    answers[:] = [0]  # Remove
    _click(qtbot, page.remove_button)
    wait_until(app, lambda: page.table.rowCount() == 2, 10, "the mark removed")
    assert sorted(m.name for m in store.marks()) == ["demo-1-5-files", "summer holiday"]
