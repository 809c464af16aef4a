"""The console as a person meets it: every toolbar button of the volume view clicked and every
menu action triggered on the real widgets, dialogs answered as a person would (the conftest's
`errors` fixture fails a test on any unexpected error dialog or exception, `no_thread_leaks` on
threads left running). Issue 15, defects 1-4."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import shot, type_and_accept, wait_until, when_modal
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
    assert button.isVisible() and button.isEnabled(), button.text()
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
