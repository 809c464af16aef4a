"""The engine never imports Qt (napari-style boundary): checked in a fresh interpreter."""

import subprocess
import sys


def test_engine_imports_no_qt() -> None:
    code = (
        "import sys, pkgutil, importlib, rewind.engine as e\n"
        "for m in pkgutil.walk_packages(e.__path__, 'rewind.engine.'):\n"
        "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'PyQt5', 'PyQt6', 'pyqtgraph', 'superqt', 'qtpy')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
