"""Entry point for frozen builds (PyInstaller): the same `rewind` command as the installed one."""

from rewind.engine.cli import main

raise SystemExit(main())
