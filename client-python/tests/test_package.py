"""The package the tests import is the one pip installed from the wheel
(scripts/python-env): typed (py.typed and the native module's stubs next
to it) and registering its pytest plugin."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import covet


def test_the_installed_package_is_typed_and_registers_its_pytest_plugin() -> None:
    here = Path(covet.__file__).parent
    names = {p.name for p in here.iterdir()}
    assert {"py.typed", "_covet.pyi", "testing.py", "pytest_plugin.py"} <= names, names
    assert any(n.startswith("_covet.") and n.endswith((".so", ".pyd")) for n in names), names
    plugins = {e.name: e.value for e in entry_points(group="pytest11")}
    assert plugins.get("covet") == "covet.pytest_plugin", plugins
