"""Serve from the console (a real NBD client reads the URI it shows), closing while served asks,
verify finds real damage in a journal and says so loudly; the dark palette looks right."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import shot, wait_until
from helpers import tiny_tmpfs


def _small_store(tmp: Path, blocks: int = 64) -> Path:
    from rewind.engine.store import Store

    with Store.create(tmp / "disk.img", tmp / "store", size=4 << 20) as s:
        for i in range(blocks):
            s.live.write(i * 4096, bytes([i % 251 + 1]) * 4096)
        s.mark("filled")
        for i in range(0, blocks, 2):
            s.live.write(i * 4096, b"\xee" * 4096)
        s.live.flush()
    return tmp / "store"


def test_serve_shows_uri_and_close_asks(window: Any, app: Any, tmp_path: Path, answers: list[int]) -> None:
    view = window.open_store(str(_small_store(tmp_path)))
    wait_until(app, lambda: view.snap is not None, 20, "the store to open")
    view.serve_button.click()
    wait_until(app, lambda: view.serve_uri.text().startswith("nbd+unix://"), 20, "the NBD URI")
    uri = view.serve_uri.text()
    assert view.serve_row.isVisible()
    view.copy_button.click()
    assert app.clipboard().text() == uri
    wait_until(app, lambda: view.snap.served == uri, 10, "the served state")
    assert window.st_front.text().startswith("NBD: serving")
    if shutil.which("nbdinfo"):
        out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and int(out.stdout) == 4 << 20, out.stderr
    # a past point reads through the same server: the mark's contents
    if shutil.which("nbdcopy"):
        past = tmp_path / "past.img"
        subprocess.run(["nbdcopy", uri.replace("///", "///at=mark:filled"), str(past)], check=True, timeout=30)
        assert past.read_bytes()[:4096] == bytes([1]) * 4096
    # closing while served asks; "Cancel" keeps the window and the server
    tray = window.tray is not None
    answers[:] = [2 if tray else 1]
    window.close()
    app.processEvents()
    assert window.isVisible() and view.snap.served
    answers[:] = [1 if tray else 0]  # stop and quit
    window.close()
    app.processEvents()
    assert not window.isVisible() and window.views == []


def test_verify_finds_damage(window: Any, app: Any, tmp_path: Path, errors: Any) -> None:
    from rewind.app.dialogs import errors as errdlg

    errors.expect("damage")

    store_dir = _small_store(tmp_path)
    segs = sorted((store_dir / "journal").glob("*"))
    assert segs, "the journal has segment files"
    seg = max(segs, key=lambda p: p.stat().st_size)
    data = bytearray(seg.read_bytes())
    for off in range(len(data) // 3, len(data) // 3 + 64):  # a stretch of flipped bits mid-journal
        data[off] ^= 0x5A
    seg.write_bytes(bytes(data))
    view = window.open_store(str(store_dir))
    wait_until(app, lambda: view.snap is not None or view.error is not None, 20, "the store to open")
    if view.error is not None:
        pytest.skip(f"the engine refuses to open this damage already: {view.error}")
    view.verify_button.click()
    wait_until(app, lambda: view.job_dialog is not None and view.job_dialog.finished_state, 60, "verify")
    assert view.job_dialog.finished_state == "failed"
    box = wait_until(app, lambda: next((b for b in errdlg.OPEN_DIALOGS if "damage" in b.windowTitle().lower()),
                                       None), 10, "the damage dialog")
    assert "problem" in box.text()
    assert any(n[0] == "Verify found damage" and n[2] == "critical" for n in window.notifications)
    shot(window, "verify-damage", dialog=box)


def test_dark_palette_and_block_map(window: Any, app: Any, tmp_path: Path, qtbot: Any) -> None:
    from PySide6.QtCore import QPoint, Qt
    from rewind.app.theme import apply_theme

    apply_theme(app, "dark")
    try:
        view = window.open_store(str(_small_store(tmp_path)))
        wait_until(app, lambda: view.snap is not None and view.preview is not None, 20, "the store to open")
        wait_until(app, lambda: view.charts.chart is not None and not view.charts.chart.empty, 10, "the charts")
        bg = window.palette().window().color()
        assert bg.lightness() < 100
        assert view.preview.fs_type is None  # raw blocks: the block map and hex view
        view.timeline.jump_to_mark(view.snap.marks[0])
        wait_until(app, lambda: view.preview.seq == view.snap.marks[0].seq, 10, "the mark's preview")
        assert len(view.preview.changed_blocks) == 32
        # a click on the block map shows that block, as it was, in hex
        bm = view.preview_pane.block_map
        cell_x, cell_y = 4 + 2 * 8 + 3, 4 + 3  # the third cell: block 2 (one block per cell here)
        assert bm.block_at(cell_x, cell_y) == 2
        qtbot.mouseClick(bm, Qt.MouseButton.LeftButton, pos=QPoint(cell_x, cell_y))
        wait_until(app, lambda: "Block 2 " in view.preview_pane.block_label.text(), 10, "the block's hex")
        assert view.preview_pane.block_hex.toPlainText().startswith("00002000  03 03 03")
        shot(window, "volume-dark-blocks")
    finally:
        apply_theme(app, "light")


def test_protect_new_image_and_close_during_job(window: Any, app: Any, tmp_path: Path,
                                                answers: list[int]) -> None:
    """Protect a new sparse image from the console; closing while an export runs asks, then
    cancels it cleanly (no file left)."""
    import threading

    from PySide6.QtCore import Qt
    from rewind.app.dialogs.protect import default_store_dir

    image = tmp_path / "new-disk.img"
    suggested = default_store_dir(str(image))
    assert "rewind" in str(suggested) and suggested.name == "new-disk.img"
    view = window.protect(str(image), str(suggested), 8 << 20)
    wait_until(app, lambda: view.snap is not None, 20, "the new protection")
    assert image.stat().st_size == 8 << 20 and (suggested / "store.json").exists()
    assert view.preview is not None or wait_until(app, lambda: view.preview, 10, "a preview")

    first, proceed = threading.Event(), threading.Event()

    def hold(kind: str, ev: Any) -> None:  # job thread: keep the export mid-way until closed
        if not first.is_set():
            first.set()
            proceed.wait(10)

    view.worker.jobProgress.connect(hold, Qt.ConnectionType.DirectConnection)
    out = tmp_path / "out"
    out.mkdir()
    view.export_point(str(out / "x.img"))
    wait_until(app, first.is_set, 20, "the export to start")
    answers[:] = [1]  # "Keep running": the window stays
    window.close()
    assert window.isVisible() and view.worker.busy
    answers[:] = [0]  # "Stop and quit"
    threading.Timer(0.3, proceed.set).start()
    window.close()
    assert not window.isVisible()
    assert list(out.iterdir()) == [], "the cancelled export left nothing"


def test_journal_near_limit_notifies(window: Any, app: Any, tmp_path: Path) -> None:
    from rewind.engine.store import Store

    store_dir = _small_store(tmp_path)
    with Store.open(store_dir) as s:
        used = s.stats()[-1].journal_bytes
        s.set_retention(max_size=int(used / 0.93))
    window.open_store(str(store_dir))
    wait_until(app, lambda: any(n[0] == "Journal nearly full" for n in window.notifications), 20,
               "the near-limit notification")
    assert " of " in window.st_journal.text()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs: a real full disk (needs root to mount)."""
    with tiny_tmpfs(tmp_path / "tiny") as mnt:
        yield mnt


def test_full_disk_export_says_so(window: Any, app: Any, tmp_path: Path, tiny_disk: Path, errors: Any) -> None:
    from rewind.app.dialogs import errors as errdlg
    from rewind.engine.store import Store

    errors.expect("Export failed: The disk is full")

    with Store.create(tmp_path / "disk.img", tmp_path / "store", size=4 << 20) as s:
        s.live.write(0, bytes(range(256)) * (3 << 12))  # 3 MiB of data: more than the disk holds
    view = window.open_store(str(tmp_path / "store"))
    wait_until(app, lambda: view.preview is not None, 20, "the store to open")
    view.export_point(str(tiny_disk / "out.img"))
    wait_until(app, lambda: view.job_dialog.finished_state, 30, "the export to fail")
    assert view.job_dialog.finished_state == "failed"
    box = wait_until(app, lambda: errdlg.OPEN_DIALOGS[-1] if errdlg.OPEN_DIALOGS else None, 10, "a dialog")
    assert "disk is full" in box.text().lower() and "free" in box.informativeText().lower()
    assert list(tiny_disk.iterdir()) == [], "nothing half-written is left on the full disk"


@pytest.mark.qt_no_exception_capture
def test_exception_in_a_slot_shows_a_dialog_and_the_app_lives_on(window: Any, app: Any, errors: Any) -> None:
    import sys

    from PySide6.QtCore import QTimer
    from rewind.app.dialogs import errors as errdlg
    from rewind.app.main import _install_excepthook
    from rewind.engine.errors import CorruptionError

    errors.expect("Something went wrong: The protection's history is damaged")
    old = sys.excepthook
    _install_excepthook(lambda: window)
    try:
        def boom() -> None:
            raise CorruptionError("seg 3 offset 4096: checksum mismatch", "/s/journal/3", 4096)

        QTimer.singleShot(0, boom)
        box = wait_until(app, lambda: next((b for b in errdlg.OPEN_DIALOGS
                                            if b.windowTitle() == "Something went wrong"), None), 10, "the dialog")
        assert "damaged" in box.text() and "Verify" in box.informativeText()
        assert "Traceback" in box.detailedText()
        assert window.isVisible()
    finally:
        sys.excepthook = old


def test_failed_write_through_serve_notifies(window: Any, app: Any, tmp_path: Path, tiny_disk: Path) -> None:
    """The history lives on a disk that fills up: a client's write through the console's NBD
    server fails, the client gets an error, and the console says so loudly."""
    from rewind.engine.store import Store

    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed: no NBD client to write with")
    Store.create(tmp_path / "disk.img", tiny_disk / "store", size=8 << 20).close()
    view = window.open_store(str(tiny_disk / "store"))
    wait_until(app, lambda: view.snap is not None, 20, "the store to open")
    view.serve_button.click()
    uri = wait_until(app, lambda: view.serve_uri.text(), 20, "the NBD URI")
    r = subprocess.run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 0 3M", "-c", "flush"],
                       capture_output=True, text=True, timeout=60)
    assert "error" in (r.stdout + r.stderr).lower() or r.returncode != 0, r.stdout + r.stderr
    wait_until(app, lambda: any(n[0] == "A write failed" for n in window.notifications), 20,
               "the failed-write notification")
    note = next(n for n in window.notifications if n[0] == "A write failed")
    assert note[2] == "critical" and "full" in note[1].lower(), note
    view.serve_button.click()
