"""The wheel: what it contains, and that an install of it alone runs.

A wheel is built from a snapshot of the work tree (``python -m build --wheel
--no-isolation``) and installed with ``--no-deps`` into a fresh
``--system-site-packages`` venv, which supplies the dependencies.

Why that install is the one that runs, not the editable one at /work/main:
the venv's site-packages precedes the system's on ``sys.path``, and the
system's editable install is a setuptools finder appended to the *end* of
``sys.meta_path``, so it only answers for names nothing on ``sys.path``
provides; ``importlib.metadata`` likewise takes the first ``outrider``
distribution on ``sys.path`` (the venv's) for the entry points. User
site-packages and PYTHONPATH are switched off (``support.VENV_ENV``).
``test_the_wheel_install_is_what_gets_imported`` checks all of that rather
than trusting it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest

from support import REPO_ROOT, VENV_ENV, Venv, copy_source_tree, free_port

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
#: Built-in extensions: entry-point name -> module.
BUILTINS: dict[str, str] = PYPROJECT["project"]["entry-points"]["outrider"]


def module_dir(module: str) -> str:
    """``outrider.extensions.filters.http.router`` -> its folder in the wheel."""
    return module.replace(".", "/")


class WheelInstall:
    def __init__(self, venv: Venv, wheel: Path) -> None:
        self.venv = venv
        self.wheel = wheel


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> WheelInstall:
    root = tmp_path_factory.mktemp("packaging")
    venv = Venv(root / "venv")
    # The build runs with the venv's interpreter: `build` itself comes from
    # the system site-packages, the backend pyproject names (setuptools>=68,
    # wheel) from the system when it has them, else from the venv.
    venv.ensure_build_backend()
    assert venv.run("-m", "build", "--version").returncode == 0
    src = copy_source_tree(REPO_ROOT, root / "src")
    dist = root / "dist"
    venv.run("-m", "build", "--wheel", "--no-isolation", "-o", str(dist), str(src), timeout=180)
    (wheel,) = dist.glob("outrider-*.whl")
    # --ignore-installed: install beside, not over, the system's editable one.
    venv.pip("install", "--no-deps", "--no-index", "--ignore-installed", str(wheel))
    return WheelInstall(venv, wheel)


def test_the_wheel_carries_every_data_file(wheel_install):
    names = set(zipfile.ZipFile(wheel_install.wheel).namelist())
    assert wheel_install.wheel.name.startswith(f"outrider-{VERSION}-")
    # Only the import package and its metadata: the folder names core/ and
    # extensions/ are mapped onto outrider and outrider.extensions.
    assert {n.split("/")[0] for n in names} == {"outrider", f"outrider-{VERSION}.dist-info"}, sorted(names)
    for path in ("outrider/__init__.py", "outrider/default_config.yaml", "outrider/config/schema.json"):
        assert path in names
    # Every built-in named by an entry point: its code, schema and README.
    for name, module in BUILTINS.items():
        for file in ("__init__.py", "schema.json", "README.md"):
            assert f"{module_dir(module)}/{file}" in names, (name, file)
    # Every extension folder in the tree (one with a schema.json) is packaged
    # whole, entry point or not.
    for schema in (REPO_ROOT / "extensions").rglob("schema.json"):
        folder = "outrider/extensions/" + schema.parent.relative_to(REPO_ROOT / "extensions").as_posix()
        for file in ("__init__.py", "schema.json", "README.md"):
            assert f"{folder}/{file}" in names, (folder, file)
    # The entry points themselves.
    entry_points = zipfile.ZipFile(wheel_install.wheel).read(f"outrider-{VERSION}.dist-info/entry_points.txt").decode()
    for name, module in BUILTINS.items():
        assert f"{name} = {module}" in entry_points
    assert "outrider = outrider.cli:main" in entry_points


def test_the_wheel_carries_the_c_accelerator_when_this_install_has_it(wheel_install):
    """Built by the wheel's own build (optional: a machine without a compiler
    gets a pure-Python wheel, and so does the editable install there)."""
    if importlib.util.find_spec("outrider.extensions.codecs.http1._speedups") is None:
        pytest.skip("no C accelerator here: the wheel may be pure Python")
    if os.environ.get("OUTRIDER_NO_SPEEDUPS"):
        pytest.skip("OUTRIDER_NO_SPEEDUPS is set")
    names = zipfile.ZipFile(wheel_install.wheel).namelist()
    assert any(n.startswith("outrider/extensions/codecs/http1/_speedups.") and n.endswith(".so") for n in names), names
    code = "from outrider.extensions.codecs.http1 import parser; print(parser.SPEEDUPS, parser._speedups.__file__)"
    used, where = wheel_install.venv.run("-c", code).stdout.split()
    assert used == "True" and where.startswith(str(wheel_install.venv.site_packages)), where


WHERE = """
import importlib, importlib.metadata as md, json, outrider
from importlib import resources
from outrider.config import load_config_text
from outrider.registry import load_registry
registry = load_registry()
default = resources.files("outrider").joinpath("default_config.yaml")
load_config_text(default.read_text(), registry, source="<embedded default>")
print(json.dumps({
    "outrider": outrider.__file__,
    "default_config": str(default),
    "dist": str(md.distribution("outrider").locate_file("")),
    "entry_points": {ep.name: [ep.dist.name, importlib.import_module(ep.module).__file__]
                     for ep in md.entry_points(group="outrider")},
    "readmes": {e.name: e.readme_path for e in registry.all()},
}))
"""


def test_the_wheel_install_is_what_gets_imported(wheel_install):
    venv = wheel_install.venv
    site = str(venv.site_packages) + "/"
    # From the repository's root too, where the tests start the proxy.
    for cwd in (REPO_ROOT, venv.path):
        where = json.loads(venv.run("-c", WHERE, cwd=cwd).stdout)
        assert where["outrider"] == site + "outrider/__init__.py", where
        assert where["default_config"].startswith(site), where
        assert where["dist"] + "/" == site, where
        assert set(where["entry_points"]) == set(BUILTINS), where
        for name, (dist, file) in where["entry_points"].items():
            assert dist == "outrider" and file.startswith(site), (name, file)
        for name in BUILTINS:
            assert where["readmes"][name].startswith(site), where["readmes"]


def test_extensions_list_from_the_wheel_lists_every_builtin(wheel_install):
    script = wheel_install.venv.bin / "outrider"  # the console script the wheel installed
    result = subprocess.run(
        [str(script), "extensions", "list"], capture_output=True, text=True, timeout=30,
        env={**os.environ, **VENV_ENV},
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line.split() for line in result.stdout.splitlines()[1:] if line.strip()}
    assert set(BUILTINS) <= set(rows), result.stdout
    for name in BUILTINS:
        assert "outrider" in rows[name] and VERSION in rows[name], rows[name]


def test_outrider_run_from_the_wheel_proxies_a_request(wheel_install, proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(f"""
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http:
      stat_prefix: web
      filters: [router]
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{path: /healthz}}
              direct_response: {{status: 200, body: "ok from the wheel\\n"}}
            - match: {{prefix: /}}
              route: {{cluster: backend, timeout: 5s}}
clusters:
  - name: backend
    endpoints: ["127.0.0.1:{upstream_port}"]
    lb_policy: round_robin
""", python=str(wheel_install.venv.python), env=VENV_ENV)

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/through/the/proxy?q=1", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["x-upstream"] == "upstream"
        record = json.loads(resp.read())
    assert record["path"] == "/through/the/proxy?q=1"
    assert [r["path"] for r in app["requests"]] == ["/through/the/proxy?q=1"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert (resp.status, resp.read()) == (200, b"ok from the wheel\n")
    assert proc.wait_stat("cluster.backend.upstream_rq_total", 1) == 1
    assert proc.wait_stat("http.web.downstream_rq_2xx", 2) == 2
