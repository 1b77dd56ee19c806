"""The core never imports an extension: built-ins arrive through their entry
points, exactly as a third party's do."""

from __future__ import annotations

import json
import subprocess
import sys

from support import REPO_ROOT

IMPORT_ALL_CORE = """
import json, pkgutil, sys
import outrider
names = []
def walk(path, prefix):
    for m in pkgutil.iter_modules(path, prefix):
        if m.name == "outrider.extensions" or m.name == "outrider.__main__":
            continue
        names.append(m.name)
        module = __import__(m.name, fromlist=["_"])
        if m.ispkg:
            walk(module.__path__, m.name + ".")
walk(outrider.__path__, "outrider.")
from outrider.registry import load_registry
registry = load_registry(entry_points=False)
print(json.dumps({
    "imported": names,
    "extension_modules": sorted(m for m in sys.modules if m.startswith("outrider.extensions")),
    "router_without_entry_points": registry.get("filters.http", "router") is not None,
    "router_with_entry_points": load_registry().get("filters.http", "router") is not None,
}))
"""


def test_importing_every_core_module_loads_no_extension():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL_CORE], capture_output=True, text=True, check=True, timeout=60, cwd=REPO_ROOT
    )
    result = json.loads(out.stdout)
    assert "outrider.server" in result["imported"] and "outrider.http.conn_manager" in result["imported"]
    # Loading the registry without entry points imports no extension and
    # knows no router; with them, the router is there.
    assert result["extension_modules"] == []
    assert result["router_without_entry_points"] is False
    assert result["router_with_entry_points"] is True


def test_no_core_source_file_names_an_extension_module():
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for path in sorted((REPO_ROOT / "core").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ("import" in line and "extensions" in line and not line.lstrip().startswith("#"))
    ]
    assert offenders == []
