"""The console driving the real engine: the demo comes alive, a mark's preview lists exactly what
the workload had written, export equals a reference copy, rewind and undo restore the image
byte for byte, a cancelled export leaves nothing, a damaged store gives a useful dialog."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import shot, wait_until
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFileDialog
from rewind.engine.errors import CorruptionError


def _open_demo(window: Any, app: Any) -> Any:
    view = window.open_demo(interval=0.03, seed=7)
    wait_until(app, lambda: view.snap is not None, 20, "the demo to open")
    return view


def _pause_demo(view: Any, app: Any) -> None:
    if view.worker.demo_running:
        view.demo_button.click()
    wait_until(app, lambda: not view.worker.demo_running, 10, "the demo workload to pause")


def _same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def test_welcome_view(window: Any, app: Any) -> None:
    assert window.stack.currentWidget() is window.welcome
    assert window.windowTitle() == "Rewind"
    assert not window.windowIcon().isNull()
    for b in (window.welcome.protect_button, window.welcome.open_button, window.welcome.demo_button):
        assert b.isVisible() and b.isEnabled()
    shot(window, "welcome")


def test_demo_mark_preview_export_rewind_undo(window: Any, app: Any, tmp_path: Path, qtbot: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    view = _open_demo(window, app)
    worker = view.worker
    # the charts and the slider come alive within seconds
    wait_until(app, lambda: view.snap.head > 300 and len(view.snap.marks) >= 3
               and view.charts.chart is not None and len(view.charts.chart.t) >= 2, 30, "writes and marks from the demo workload")
    assert view.state.startswith("Protecting")

    # a mark at a quiet moment, with a reference copy of the image taken right then
    _pause_demo(view, app)
    primary = Path(view.snap.primary)
    reference = tmp_path / "reference.img"
    shutil.copyfile(primary, reference)
    with qtbot.waitSignal(worker.marked, timeout=10000) as got:
        view.mark_now("checkpoint")
    mark = got.args[0]
    expected = worker.demo_log.files_at(mark.seq)
    assert len(expected) >= 6
    view.demo_button.click()  # the workload resumes: now moves on past the mark
    wait_until(app, lambda: view.snap.head > mark.seq + 200, 20, "more writes after the mark")
    wait_until(app, lambda: any(m.name == "checkpoint" for m in view.timeline.marks), 5, "the mark tick")

    # move the slider to the mark: the preview lists exactly the files written by then
    m = next(m for m in view.timeline.marks if m.name == "checkpoint")
    view.timeline.setFocus()
    view.timeline.jump_to_mark(m)
    wait_until(app, lambda: view.preview is not None and view.preview.seq == mark.seq, 10, "the preview at the mark")
    assert view.preview_pane.listed_files() == expected
    assert "checkpoint" in view.point_label.text()
    # record-by-record and mark-to-mark keys
    qtbot.keyClick(view.timeline, Qt.Key.Key_Left)
    wait_until(app, lambda: view.preview.seq == mark.seq - 1, 10, "one record back")
    qtbot.keyClick(view.timeline, Qt.Key.Key_PageDown)
    wait_until(app, lambda: view.preview.seq == mark.seq, 10, "the next mark")
    counts = view.preview.counts()
    assert sum(counts.values()) > 0, "files changed since the mark are marked"
    shot(window, "volume-demo")
    shot(window, "volume")  # the README's picture
    candidates = [e for e in view.preview.entries if e.status in ("changed", "deleted") and not e.is_dir]
    # a picture or a text shows best in the screenshot; any changed file will do otherwise
    candidates.sort(key=lambda e: (not e.path.endswith(".png"), not e.path.endswith(".txt")))
    changed = candidates[0]
    view.preview_pane.select_path(changed.path)
    wait_until(app, lambda: view.preview_pane.content.currentIndex() in (1, 2, 3), 10, "the file's contents")
    shot(window, "preview-past-point")
    # Save as... restores that one file as it was at the mark
    restored = tmp_path / "restored.bin"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(restored), ""))
    view.preview_pane.save_button.click()
    wait_until(app, restored.exists, 10, "the restored file")
    from rewind.app.demo import digest

    assert digest(restored.read_bytes()) == expected[changed.path]

    # export that point: equal to the reference copy
    out = tmp_path / "export.img"
    view.export_point(str(out))
    wait_until(app, lambda: view.job_dialog.finished_state, 60, "the export")
    assert view.job_dialog.finished_state == "done"
    assert _same_file(out, reference)
    view.job_dialog.accept()

    # rewind to the mark (confirmation says what will change), then undo
    _pause_demo(view, app)
    before = tmp_path / "before-rewind.img"
    shutil.copyfile(primary, before)
    view.go_to_seq(mark.seq)
    wait_until(app, lambda: view.preview.seq == mark.seq, 10, "the preview at the mark")
    view.rewind_point()
    dlg = wait_until(app, lambda: view.rewind_dialog, 20, "the rewind confirmation")
    assert "blocks" in dlg.body.text() and dlg.rewind_button.isEnabled()
    qtbot.wait(50)  # let the layout settle (the "working out" bar just went away)
    shot(window, "rewind-confirm", dialog=dlg)
    dlg.rewind_button.click()
    wait_until(app, lambda: view.info_bar.isVisible() and view._undo_mark, 60, "the rewind")
    assert _same_file(primary, reference), "the image equals the marked point after the rewind"
    assert view._undo_mark.startswith("before-rewind-")
    view.info_bar.button.click()  # Undo
    wait_until(app, lambda: not view._undo_mark and not worker.busy, 60, "the undo")
    assert _same_file(primary, before), "undo brings back the image as it was before the rewind"


def test_cancel_export_leaves_nothing(window: Any, app: Any, tmp_path: Path) -> None:
    view = _open_demo(window, app)
    wait_until(app, lambda: view.preview is not None and len(view.preview.files()) >= 8, 30,
               "a preview of now with files in it")
    worker = view.worker
    first = threading.Event()
    proceed = threading.Event()

    def hold_at_first_event(kind: str, ev: Any) -> None:  # runs in the job thread (direct connection)
        if not first.is_set():
            first.set()
            proceed.wait(10)

    worker.jobProgress.connect(hold_at_first_event, Qt.ConnectionType.DirectConnection)
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    out = out_dir / "half.img"
    view.export_point(str(out))
    wait_until(app, first.is_set, 20, "the export to start")
    wait_until(app, lambda: view.job_dialog.bar.value() > 0, 10, "progress in the dialog")
    shot(window, "export-progress", dialog=view.job_dialog)
    view.job_dialog.cancel_button.click()  # cancel halfway
    proceed.set()
    wait_until(app, lambda: view.job_dialog.finished_state, 30, "the cancel")
    assert view.job_dialog.finished_state == "cancelled"
    assert list(out_dir.iterdir()) == [], "no partial file remains"
    worker.jobProgress.disconnect(hold_at_first_event)


@pytest.mark.parametrize("damage", ["corrupt-description", "missing-image"])
def test_broken_store_gives_useful_dialog(window: Any, app: Any, tmp_path: Path, damage: str, errors: Any) -> None:
    from rewind.app.dialogs import errors as errdlg
    from rewind.engine.store import Store

    errors.expect("Cannot open the protection")

    store_dir = tmp_path / "store"
    image = tmp_path / "disk.img"
    with Store.create(image, store_dir, size=1 << 20) as s:
        s.live.write(0, b"x" * 4096)
        s.mark("one")
    if damage == "corrupt-description":
        (store_dir / "store.json").write_bytes(b"{\x00garbage")
    else:
        image.unlink()
    view = window.open_store(str(store_dir))
    box = wait_until(app, lambda: errdlg.OPEN_DIALOGS[-1] if errdlg.OPEN_DIALOGS else None, 20, "an error dialog")
    assert view.state == "Failed to open"
    text = box.text() + " " + box.informativeText()
    if damage == "corrupt-description":
        assert isinstance(view.error, CorruptionError)
        assert "damaged" in text and "Verify" in text
        shot(window, "error-corrupt-store", dialog=box)
    else:
        assert "missing" in text.lower() or "does not exist" in text.lower() or "no such file" in text.lower(), text
    box.done(0)
    window.close_view(view)
    assert window.views == []
