"""The Rewind desktop console (PySide6 + pyqtgraph) on the engine's public API.

PySide6 6.12.0 on CPython 3.11 returns True from Signal.emit() without taking a reference, so
every emit (ours and pyqtgraph's, thousands a minute) lowers True's reference count until the
interpreter aborts with "bool_dealloc: deallocating True or False" (some slot calls do the same to
None: "none_dealloc"). pyproject.toml pins PySide6 below 6.12 for that reason (6.11.3 is clean).
Where a PySide6 of 6.12 or later is installed anyway (a distribution's package), True, False and
None get a reference count no program can use up, as CPython 3.12+ does (immortal objects).
"""

from __future__ import annotations

import sys


def _immortalize_bools() -> None:
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return
    try:
        import PySide6
        major, minor = (int(x) for x in PySide6.__version__.split(".")[:2])
    except (ImportError, ValueError, AttributeError):
        return
    if (major, minor) < (6, 12):
        return  # the pinned releases take their references properly
    import ctypes

    for obj in (True, False, None):
        refcnt = ctypes.c_ssize_t.from_address(id(obj))  # ob_refcnt is the first field
        refcnt.value += 1 << 40


_immortalize_bools()
