"""Long use, then quit, in a process of its own (run by test_gui_medium.test_long_use_then_quit):
views opened and closed, the theme switched, exports started and cancelled, then File > Quit and
the interpreter's own exit, where a wrong owner of a Qt object shows as a crash (exit -11) or
as Qt's "shared QObject was deleted directly". Usage: quit_stress.py WORKDIR [ROUNDS]."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> int:
    work = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    os.environ["XDG_DATA_HOME"] = str(work / "data")
    os.environ["XDG_CONFIG_HOME"] = str(work / "config")
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QFileDialog

    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, str(work / "config"))
    from rewind.app import main as console
    from rewind.app.dialogs import errors as errdlg
    from rewind.engine.store import Store

    app = console.make_app()  # console.main() below reuses it, and runs its window as always
    window: Any = None
    errdlg.ask = lambda *a, **k: 0  # every question: the first answer (stop and close, quit)
    exports = work / "exports"
    exports.mkdir()
    names = iter(range(10**6))
    QFileDialog.getSaveFileName = staticmethod(  # type: ignore[method-assign]
        lambda *a, **k: (str(exports / f"e{next(names)}.img"), ""))

    def wait(cond: Any, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise SystemExit(f"timed out: {cond}")
            app.processEvents()
            time.sleep(0.005)

    def action(menu: str, text: str) -> Any:
        for top in window.menuBar().actions():
            if top.text().replace("&", "") == menu:
                for a in top.menu().actions():
                    if a.text().replace("&", "") == text:
                        return a
        raise SystemExit(f"no {menu} > {text}")

    def select(view: Any) -> None:
        window.volume_list.setCurrentRow(window.views.index(view) + 1)

    def scenario() -> None:
        nonlocal window
        window = next(w for w in app.topLevelWidgets() if isinstance(w, console.MainWindow))
        for r in range(rounds):
            d = work / f"s{r}"
            d.mkdir()
            with Store.create(d / "disk.img", d / "store", size=16 << 20) as s:
                for i in range(32):
                    s.live.write(i * 4096, bytes([i + 1]) * 4096)
            demo = window.open_demo(interval=0.02, seed=r)
            other = window.open_store(str(d / "store"))
            assert other is not None
            wait(lambda d=demo, o=other: d.snap is not None and o.snap is not None and o.preview is not None)
            for mode in ("Dark", "Light", "Follow the desktop"):
                action("View", mode).trigger()
                app.processEvents()
            for v in (other, demo):
                select(v)
                wait(lambda v=v: v.preview is not None)
                action("Volume", "Export this point...").trigger()
                if v.job_dialog is not None and not v.job_dialog.finished_state:
                    v.job_dialog.cancel_button.click()
                wait(lambda v=v: v.job_dialog is None or v.job_dialog.finished_state)
                if v.job_dialog is not None:
                    v.job_dialog.close_button.click()
            select(other)
            action("File", "Close this protection").trigger()
            if r % 2:
                select(demo)
                action("File", "Close this protection").trigger()
            for box in list(errdlg.OPEN_DIALOGS):
                box.done(0)
            app.processEvents()
        # one export left running when quitting: "Stop and quit"
        v = window.views[-1]
        select(v)
        action("Volume", "Export this point...").trigger()
        action("File", "Quit").trigger()

    def run() -> None:
        try:
            scenario()
        except BaseException:  # noqa: BLE001 - a failed scenario is its own exit status, not a hang
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(3)

    QTimer.singleShot(0, run)
    rc = console.main([])
    print(f"quit with {rc}", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
