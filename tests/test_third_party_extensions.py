"""Third-party extensions, installed with pip into a venv, as a user would.

One module-scoped ``--system-site-packages`` venv (it sees the installed
dependencies and the editable outrider; nothing is downloaded when the
system has the build backend) gets two third-party distributions:
``examples/outrider-add-header`` and ``outrider-boom-filter``, a tiny
package written here, whose ``boom`` filter raises when a request carries
``x-boom`` and otherwise adds ``x-boom-filter`` to the response. The proxy is
then run with the venv's interpreter against a real aiohttp upstream.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from support import REPO_ROOT, VENV_ENV, Venv, copy_source_tree, free_port, http_get

ADD_HEADER_SRC = REPO_ROOT / "examples" / "outrider-add-header"

BOOM_DIST, BOOM_VERSION = "outrider-boom-filter", "0.3.1"
TWIN_DIST, TWIN_VERSION = "outrider-boom-twin", "2.0.0"


def write_filter_package(root: Path, dist: str, version: str, module: str, extension: str) -> Path:
    """A complete third-party package: pyproject.toml with the ``outrider``
    entry point, the module with its ``outrider_register`` hookimpl,
    schema.json and README.md beside it."""
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "{version}"
        description = "A test filter that fails on demand"
        requires-python = ">=3.11"
        dependencies = ["outrider"]

        [project.entry-points.outrider]
        {extension} = "{module}"

        [tool.setuptools]
        packages = ["{module}"]

        [tool.setuptools.package-data]
        {module} = ["schema.json", "README.md"]
        """))
    (pkg / module / "__init__.py").write_text(textwrap.dedent(f'''\
        """{extension}: raises in on_request_headers when the request has x-boom."""

        from outrider import Extension, HttpFilter, HttpFilterFactory, hookimpl


        class Boom(HttpFilter):
            def on_request_headers(self, request, end_stream):
                if request.headers.has("x-boom"):
                    raise RuntimeError("kaboom: x-boom was set")

            def on_response_headers(self, response, end_stream):
                response.headers.append(("x-boom-filter", self.config))


        def create(config, ctx):
            return HttpFilterFactory(Boom, config.get("value", "passed"))


        @hookimpl
        def outrider_register(registry):
            registry.add(Extension.from_module(
                __name__, name="{extension}", category="filters.http", factory=create,
                status="wip", description="Fails requests that carry x-boom.",
            ))
        '''))
    (pkg / module / "schema.json").write_text(json.dumps({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "properties": {"value": {"type": "string", "description": "The x-boom-filter response header's value."}},
    }, indent=2))
    (pkg / module / "README.md").write_text(
        f"# {extension}\n\nRaises in `on_request_headers` when the request has `x-boom`;"
        " otherwise adds `x-boom-filter: <value>` to the response.\n"
    )
    return pkg


class ThirdParty:
    def __init__(self, venv: Venv, wheelhouse: Path) -> None:
        self.venv = venv
        self.wheelhouse = wheelhouse

    def wheel(self, dist: str) -> Path:
        (found,) = self.wheelhouse.glob(dist.replace("-", "_") + "-*.whl")
        return found


@pytest.fixture(scope="module")
def third_party(tmp_path_factory) -> ThirdParty:
    root = tmp_path_factory.mktemp("third_party")
    venv = Venv(root / "venv")
    # setuptools>=68 as the packages here ask, and wheel too (setuptools
    # before 70.1 builds no wheel without it), as the outrider project names.
    venv.ensure_build_backend()
    venv.ensure_build_backend(ADD_HEADER_SRC / "pyproject.toml")
    # A copy of the example, so that the build writes no build/ or egg-info
    # into the work tree.
    add_header = copy_source_tree(ADD_HEADER_SRC, root / "outrider-add-header")
    boom = write_filter_package(root, BOOM_DIST, BOOM_VERSION, "outrider_boom_filter", "boom")
    twin = write_filter_package(root, TWIN_DIST, TWIN_VERSION, "outrider_boom_twin", "boom")
    # Build each package once, without build isolation (offline), then install
    # the two that coexist; the twin is only for the name-clash test's venv.
    wheelhouse = root / "wheelhouse"
    venv.pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheelhouse), str(add_header), str(boom), str(twin))
    tp = ThirdParty(venv, wheelhouse)
    venv.pip("install", "--no-deps", "--no-index", str(tp.wheel("outrider-add-header")), str(tp.wheel(BOOM_DIST)))
    return tp


def listener(port: int, stat_prefix: str, filters: str, upstream_port: int) -> str:
    return f"""
listeners:
  - name: {stat_prefix}
    address: 127.0.0.1:{port}
    http:
      stat_prefix: {stat_prefix}
      filters:
{textwrap.indent(textwrap.dedent(filters).strip(), " " * 8)}
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: upstream}}
clusters:
  - name: upstream
    endpoints: ["127.0.0.1:{upstream_port}"]
"""


def request(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.headers, resp.read()


def test_extensions_list_shows_both_distributions_and_versions(third_party):
    result = third_party.venv.outrider("extensions", "list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    for name, dist, version in (("add_header", "outrider-add-header", "0.1.0"), ("boom", BOOM_DIST, BOOM_VERSION)):
        assert name in rows, result.stdout
        cells = rows[name].split()
        assert cells[0] == "filters.http"
        assert dist in cells and version in cells, rows[name]
    # The built-ins are still there, from the (system) outrider distribution.
    assert "router" in rows and "outrider" in rows["router"].split()


def test_add_header_does_what_its_readme_says(third_party, proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(listener(port, "web", """
        - name: add_header
          config:
            request_headers: {x-team: payments}
            response_headers: {x-served-by: outrider}
            require_header: x-api-key
        - router
    """, upstream_port), python=str(third_party.venv.python), env=VENV_ENV)

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    # Without x-api-key: a 403 from the proxy; nothing reaches the upstream.
    status, headers, body = request(conn, "/a")
    assert status == 403
    assert body == b"missing x-api-key\n"
    assert app["requests"] == []
    # With it: proxied, x-team added on the way up, x-served-by on the way back.
    status, headers, body = request(conn, "/b", {"x-api-key": "k"})
    assert status == 200, body
    assert headers["x-served-by"] == "outrider"
    (seen,) = app["requests"]
    assert ["x-team", "payments"] in seen["headers"]
    assert ["x-api-key", "k"] in seen["headers"]
    conn.close()
    # Its stats, under add_header.<stat_prefix> (default "add_header").
    assert proc.wait_stat("add_header.add_header.added", 1) == 1
    assert proc.stat("add_header.add_header.rejected") == 1
    assert proc.stat("http.web.downstream_rq_4xx") == 1


def test_add_header_schema_rejects_bad_config_with_file_line_col(third_party, tmp_path):
    path = tmp_path / "bad.yaml"
    text = f"admin:\n  address: 127.0.0.1:{free_port()}\n" + listener(free_port(), "web", """
        - name: add_header
          config:
            response_headers: {x-served-by: 5}
            require_headr: x-api-key
        - router
    """, free_port())
    path.write_text(text)
    lines = text.splitlines()
    value_line = next(i for i, l in enumerate(lines, 1) if "x-served-by: 5" in l)
    key_line = next(i for i, l in enumerate(lines, 1) if "require_headr" in l)

    result = third_party.venv.outrider("validate", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    value_col = lines[value_line - 1].index("5") + 1
    key_col = lines[key_line - 1].index("require_headr") + 1
    assert f"{path}:{value_line}:{value_col}: listeners[0].http.filters[0].config.response_headers.x-served-by:" in err, err
    assert f"{path}:{key_line}:{key_col}: listeners[0].http.filters[0].config.require_headr: unknown field" in err, err
    assert "'require_header'" in err  # the closest match is suggested
    # The same config with a valid block passes.
    path.write_text(text.replace("{x-served-by: 5}", "{x-served-by: outrider}").replace("require_headr", "require_header"))
    result = third_party.venv.outrider("validate", str(path))
    assert result.returncode == 0, result.stderr


def test_an_exception_in_a_filter_fails_only_that_request(third_party, proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(listener(port, "boomy", """
        - name: boom
          config: {value: fine}
        - router
    """, upstream_port), python=str(third_party.venv.python), env=VENV_ENV)
    pid = json.loads(_admin(proc, "/server_info"))["pid"]

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    status, headers, body = request(conn, "/ok-before")
    assert status == 200 and headers["x-boom-filter"] == "fine"
    sock = conn.sock

    status, headers, body = request(conn, "/explode", {"x-boom": "1"})
    assert status == 500, body
    assert proc.wait_stat("http.boomy.filter_error", 1) == 1
    assert [r["path"] for r in app["requests"]] == ["/ok-before"]  # never forwarded
    log_lines = [l for l in proc.output().splitlines() if "kaboom" in l and "ERROR" in l]
    assert log_lines, proc.output()
    assert "'boom'" in log_lines[0] and "on_request_headers" in log_lines[0], log_lines[0]

    # The same connection keeps serving (http.client would have dropped the
    # socket if the 500 had closed it) ...
    assert conn.sock is sock, "the connection was closed after the filter error"
    status, headers, _ = request(conn, "/ok-same-connection")
    assert status == 200 and headers["x-boom-filter"] == "fine"
    assert conn.sock is sock
    conn.close()
    # ... and so does a new one, in the same process.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    status, headers, _ = request(conn, "/ok-new-connection")
    assert status == 200 and headers["x-boom-filter"] == "fine"
    conn.close()
    assert proc.proc.poll() is None
    assert json.loads(_admin(proc, "/server_info"))["pid"] == pid
    assert proc.stat("http.boomy.filter_error") == 1
    assert proc.wait_stat("http.boomy.downstream_rq_2xx", 3) == 3
    assert proc.stat("http.boomy.downstream_rq_5xx") == 1


def test_two_distributions_registering_one_name_is_a_startup_error(third_party, tmp_path):
    venv = Venv(tmp_path / "clash-venv")
    venv.pip("install", "--no-deps", "--no-index", str(third_party.wheel(BOOM_DIST)), str(third_party.wheel(TWIN_DIST)))
    config = tmp_path / "ok.yaml"
    config.write_text(f"admin:\n  address: 127.0.0.1:{free_port()}\nlisteners: []\nclusters: []\n")

    for args in (("run", "-c", str(config)), ("extensions", "list"), ("validate", str(config))):
        try:
            result = venv.outrider(*args, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`outrider {' '.join(args)}` started despite the name clash")
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        err = result.stderr
        assert "two extensions named 'boom' in category 'filters.http'" in err, err
        assert f"'{BOOM_DIST}'" in err and f"'{TWIN_DIST}'" in err, err
        assert "outrider_boom_filter" in err and "outrider_boom_twin" in err, err


def _admin(proc, path: str) -> str:
    status, body = http_get(proc.admin + path)
    assert status == 200, body
    return body
