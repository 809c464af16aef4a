"""Every package folder under engine/ and app/ is installed under the rewind namespace."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(cfg["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("engine", "app"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join(("rewind", *rel)))
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
