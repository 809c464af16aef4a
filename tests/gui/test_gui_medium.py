"""Medium defects met by a new user (issue 15, items 5-10), each driven through the real widgets:
a click in a thinned stretch of the timeline, closing the upper of two protections, the history
folder that cannot be made, the dark theme switched live, and quitting while an export runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import wait_until
from PySide6.QtCore import Qt

BS = 4096


def menu_action(window: Any, menu: str, text: str) -> Any:
    """The real QAction in the menu bar (labels compared without their & accelerators)."""
    for top in window.menuBar().actions():
        if top.text().replace("&", "") == menu:
            for a in top.menu().actions():
                if a.text().replace("&", "") == text:
                    return a
    raise AssertionError(f"no {menu} > {text} in the menu bar")


def small_store(tmp: Path, name: str, writes: int = 4) -> Path:
    from rewind.engine.store import Store

    d = tmp / name
    d.mkdir()
    with Store.create(d / "disk.img", d / "store", size=1 << 20) as s:
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
