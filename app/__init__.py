"""The Rewind desktop console (PySide6 + pyqtgraph) on the engine's public API.

PySide6 6.12 on CPython 3.11 returns True from Signal.emit() without taking a reference, so
every emit (ours and pyqtgraph's, thousands a minute) lowers True's reference count until the
interpreter aborts with "bool_dealloc: deallocating True or False" (some slot calls do the same to
None: "none_dealloc"). CPython 3.12+ makes True, False and None immortal; on older interpreters
we do the same by giving them a reference count that no program can use up. Harmless where the
bug is absent: these objects are never freed anyway.
"""

from __future__ import annotations

import sys


def _immortalize_bools() -> None:
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return
    import ctypes

    for obj in (True, False, None):
        refcnt = ctypes.c_ssize_t.from_address(id(obj))  # ob_refcnt is the first field
        refcnt.value += 1 << 40


_immortalize_bools()
