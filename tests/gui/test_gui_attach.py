"""A store held by a separate `rewind serve` opens in the console attached to that process (over
its control socket) instead of failing on the lock: live charts, previews, marks; and when the
serve process dies, the console says so instead of going quiet."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from helpers import rewind_serve


def _make_store(tmp: Path) -> Path:
    from pyfatfs.PyFatFS import PyFatBytesIOFS
    from rewind.app.demo import LiveFile, copy_in, make_fat_image
    from rewind.engine.store import Store

    store_dir = tmp / "store"
    with tempfile.TemporaryDirectory() as t:
        img = Path(t) / "fat.img"
        make_fat_image(img, 16 << 20)
        with Store.create(tmp / "vm-disk.img", store_dir, size=16 << 20) as s:
            copy_in(s.live, img)
            s.mark("formatted")
            fs = PyFatBytesIOFS(LiveFile(s.live))
            with fs.openbin("/hello.txt", "w") as f:
                f.write(b"hello from before serve\n")
            fs.close()
            s.live.flush()
    return store_dir


@pytest.fixture
def served(tmp_path: Path) -> Any:
    store_dir = _make_store(tmp_path)
    sock = tmp_path / "nbd.sock"
    with rewind_serve(store_dir, sock) as proc:
        yield store_dir, sock, proc


def test_attach_to_running_serve(window: Any, app: Any, served: Any, qtbot: Any) -> None:
    store_dir, sock, proc = served
    view = window.open_store(str(store_dir))
    wait_until(app, lambda: view.snap is not None or view.error is not None, 20, "the store to open")
    assert view.error is None, view.error
    assert view.snap.remote and view.state == "Protected by rewind serve"
    assert not view.rewind_button.isEnabled() and not view.serve_button.isEnabled()
    assert window.st_front.text() == "Attached to rewind serve"
    wait_until(app, lambda: view.preview is not None, 20, "a preview through the control socket")
    assert "/hello.txt" in view.preview.files()

    # writes made by someone else through serve's NBD socket show up live
    head = view.snap.head
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed: cannot write through the NBD socket")
    subprocess.run(["qemu-io", "-f", "raw", f"nbd+unix:///?socket={sock}", "-c", "write -P 0xab 8M 64k"],
                   check=True, capture_output=True, timeout=30)
    wait_until(app, lambda: view.snap.head > head, 10, "serve's new writes in the console")

    # a mark made from the console goes through the control socket
    with qtbot.waitSignal(view.worker.marked, timeout=10000):
        view.mark_now("from-console")
    wait_until(app, lambda: any(m.name == "from-console" for m in view.snap.marks), 10, "the mark")
    m = next(m for m in view.snap.marks if m.name == "formatted")
    view.go_to_seq(m.seq)
    wait_until(app, lambda: view.preview.seq == m.seq, 10, "the preview at 'formatted'")
    assert view.preview.files() == {}, "nothing but an empty filesystem when it was formatted"

    # an export runs inside serve (a remote job) with progress in the console
    out = store_dir.parent / "formatted.img"
    view.export_point(str(out))
    wait_until(app, lambda: view.job_dialog.finished_state, 30, "the remote export")
    assert view.job_dialog.finished_state == "done", view.job_dialog.detail.text()
    assert out.stat().st_size == 16 << 20
    view.job_dialog.accept()

    # serve dies: the console says protection stopped
    proc.send_signal(signal.SIGKILL if os.environ.get("REWIND_TEST_KILL") else signal.SIGTERM)
    proc.wait(15)
    wait_until(app, lambda: any("Protection stopped" in n[0] for n in window.notifications), 15,
               "a notification that protection stopped")
    assert view.state == "Lost touch with serve"
