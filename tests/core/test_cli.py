"""The ``outrider`` command line, run as a real process: validate, run (with a
file, with a broken file, with the embedded default), signals, extensions."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import outrider
from support import DefaultConfigProxy, ProxyProcess, free_port, http_get, port_in_use

CLI = [sys.executable, "-m", "outrider"]
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

BUILTINS = {
    ("filters.http", "router"),
    ("codecs", "http1"),
    ("filters.network", "tcp_proxy"),
    ("load_balancers", "round_robin"),
    ("load_balancers", "least_request"),
    ("load_balancers", "random"),
}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path: Path, text: str, name: str = "outrider.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def position(path: Path, line_marker: str, value: str) -> tuple[int, int]:
    """1-based (line, column) of ``value`` on the only line containing ``line_marker``."""
    lines = [(n, text) for n, text in enumerate(path.read_text().splitlines(), 1) if line_marker in text]
    assert len(lines) == 1, lines
    n, text = lines[0]
    return n, text.index(value, text.index(line_marker)) + 1


def error_lines(stderr: str, path: Path) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{path}:")]


# -- validate ---------------------------------------------------------------------


def valid_config(listener_port: int, admin_port: int) -> str:
    return f"""
    admin:
      address: 127.0.0.1:{admin_port}
    listeners:
      - name: web
        address: 127.0.0.1:{listener_port}
        http:
          stat_prefix: web
          filters: [router]
          virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
                - match: {{path: /healthz}}
                  direct_response: {{status: 200, body: "ok\\n"}}
                - match: {{prefix: /}}
                  route: {{cluster: backend, timeout: 5s}}
    clusters:
      - name: backend
        endpoints: ["127.0.0.1:1"]
        lb_policy: round_robin
    """


def test_validate_valid_config_exits_zero(tmp_path):
    listener_port, admin_port = free_port(), free_port()
    path = write(tmp_path, valid_config(listener_port, admin_port))
    result = cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: OK (1 listener, 1 cluster)"
    assert result.stderr == ""


BROKEN = """
admin:
  address: 127.0.0.1:{admin_port}
listeners:
  - name: web
    address: 127.0.0.1:{listener_port}
    http:
      stat_prefix: web
      filters: [routr]
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: nosuch, timeout: 5zz}}
clusters:
  - name: files
    endpoints: ["127.0.0.1:8080"]
    lb_policy: round_robbin
    connect_timeout: [1]
"""


ERROR_LINE = re.compile(r"(?P<line>\d+):(?P<col>\d+): (?P<path>[^ ]+): (?P<message>.+)")


def test_validate_reports_every_error_with_its_position(tmp_path):
    path = write(tmp_path, BROKEN.format(admin_port=free_port(), listener_port=free_port()), "broken.yaml")
    result = cli("validate", str(path))
    assert result.returncode != 0
    assert result.stdout == ""
    lines = error_lines(result.stderr, path)

    expected = {
        # path in the config: (where, what the message must say)
        "listeners[0].http.filters[0]": (
            position(path, "filters:", "routr"),
            ["unknown filters.http extension 'routr'", "installed: router", "did you mean 'router'?"],
        ),
        "listeners[0].http.virtual_hosts[0].routes[0].route.cluster": (
            position(path, "route: {cluster", "nosuch"),
            ["unknown cluster 'nosuch'", "files"],
        ),
        "listeners[0].http.virtual_hosts[0].routes[0].route.timeout": (
            position(path, "route: {cluster", "5zz"),
            ["duration", "'5zz'"],
        ),
        "clusters[0].lb_policy": (
            position(path, "lb_policy:", "round_robbin"),
            ["unknown load_balancers extension 'round_robbin'", "least_request, random, round_robin", "did you mean 'round_robin'?"],
        ),
        "clusters[0].connect_timeout": (
            position(path, "connect_timeout:", "[1]"),
            ["got a list"],
        ),
    }
    assert len(lines) == len(expected), result.stderr
    by_path = {}
    for line in lines:
        match = ERROR_LINE.fullmatch(line[len(f"{path}:") :])  # file:line:col: path: message
        assert match, line
        by_path[match["path"]] = ((int(match["line"]), int(match["col"])), match["message"])
    assert set(by_path) == set(expected), result.stderr
    for config_path, (where, fragments) in expected.items():
        got_where, message = by_path[config_path]
        assert got_where == where, f"{config_path}: reported at {got_where}, is at {where}"
        for fragment in fragments:
            assert fragment in message, f"{config_path}: {message!r} lacks {fragment!r}"
    assert result.stderr.rstrip().endswith(f"outrider: 5 errors in {path}; nothing started")


def test_validate_reports_yaml_syntax_error_position(tmp_path):
    path = write(
        tmp_path,
        """
        admin:
          address: 127.0.0.1:9901
        listeners:
          - name: web
            address: "127.0.0.1:10000
        clusters: []
        """,
        "syntax.yaml",
    )
    result = cli("validate", str(path))
    assert result.returncode != 0
    lines = error_lines(result.stderr, path)
    assert len(lines) == 1, result.stderr
    assert "invalid YAML" in lines[0]
    # The unterminated quoted scalar starts on line 5 (column 14); ruamel
    # reports where it ran out, and names where the construct started.
    where = lines[0].split(":")[1:3]
    assert int(where[0]) >= 5, lines[0]
    assert "line 5, column 14" in lines[0], lines[0]


def test_validate_missing_file(tmp_path):
    result = cli("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0
    assert f"cannot read {tmp_path / 'nope.yaml'}" in result.stderr
    assert "Traceback" not in result.stderr


ENV_CONFIG = """
admin:
  address: 127.0.0.1:${OUTRIDER_TEST_ADMIN_PORT}
listeners:
  - name: web
    address: 127.0.0.1:${OUTRIDER_TEST_PORT}
    http:
      stat_prefix: ${OUTRIDER_TEST_PREFIX:-fromdefault}
      filters: [router]
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {prefix: /}
              direct_response: {status: 200, body: "${OUTRIDER_TEST_BODY:-hello from default}\\n"}
clusters: []
"""


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_TEST_")}
    env.update(values)
    return env


def test_validate_env_substitution(tmp_path):
    path = write(tmp_path, ENV_CONFIG, "env.yaml")
    env = clean_env(OUTRIDER_TEST_PORT=str(free_port()), OUTRIDER_TEST_ADMIN_PORT=str(free_port()))
    ok = subprocess.run([*CLI, "validate", str(path)], capture_output=True, text=True, timeout=30, env=env)
    assert ok.returncode == 0, ok.stderr

    # An unset variable without a default is an error at that string.
    del env["OUTRIDER_TEST_PORT"]
    bad = subprocess.run([*CLI, "validate", str(path)], capture_output=True, text=True, timeout=30, env=env)
    assert bad.returncode != 0
    line, col = position(path, "address: 127.0.0.1:${OUTRIDER_TEST_PORT}", "127.0.0.1")
    assert f"{path}:{line}:{col}: listeners[0].address: environment variable OUTRIDER_TEST_PORT is not set" in bad.stderr


def test_run_substitutes_env(tmp_path, proxy):
    port, admin_port = free_port(), free_port()
    path, _ = proxy.config(ENV_CONFIG, name="env.yaml")
    env = clean_env(OUTRIDER_TEST_PORT=str(port), OUTRIDER_TEST_ADMIN_PORT=str(admin_port), OUTRIDER_TEST_BODY="hello from env")
    proc = ProxyProcess(path, admin_port, env=env)
    proxy.procs.append(proc)
    proc.wait_ready()
    status, body = http_get(f"http://127.0.0.1:{port}/")
    # A set variable wins over its default; an unset one falls back to it.
    assert (status, body) == (200, "hello from env\n")
    assert proc.wait_stat("http.fromdefault.downstream_rq_2xx", 1) == 1
    status, dump = http_get(f"{proc.admin}/config_dump")
    assert status == 200
    listener = json.loads(dump)["config"]["listeners"][0]
    assert listener["address"] == f"127.0.0.1:{port}"
    assert listener["http"]["stat_prefix"] == "fromdefault"


# -- run -------------------------------------------------------------------------


def test_run_with_invalid_config_exits_nonzero_and_binds_nothing(tmp_path, proxy):
    listener_port, admin_port = free_port(), free_port()
    text = BROKEN.format(admin_port=admin_port, listener_port=listener_port)
    proc = proxy.start(text, wait=False)
    assert proc.proc.wait(20) != 0
    output = proc.output()
    assert "unknown filters.http extension 'routr'" in output
    assert "5 errors" in output and "nothing started" in output
    assert "bound on" not in output
    assert "Traceback" not in output
    assert not port_in_use(listener_port)
    assert not port_in_use(admin_port)


def test_run_with_a_busy_port_fails_cleanly(tmp_path, proxy):
    import socket

    first, admin_port = free_port(), free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        text = f"""
        admin:
          address: 127.0.0.1:{admin_port}
        listeners:
          - name: a
            address: 127.0.0.1:{first}
            tcp: {{cluster: c}}
          - name: b
            address: 127.0.0.1:{busy_port}
            tcp: {{cluster: c}}
        clusters:
          - name: c
            endpoints: ["127.0.0.1:1"]
        """
        proc = proxy.start(text, wait=False)
        assert proc.proc.wait(20) == 1
    output = proc.output()
    assert "cannot bind" in output, output
    assert "Traceback" not in output
    assert not port_in_use(first)
    assert not port_in_use(admin_port)


@pytest.fixture
def default_ports():
    busy = [p for p in (10000, 9901) if port_in_use(p)]
    if busy:
        pytest.skip(f"`outrider run` with no -c needs 127.0.0.1:10000 and :9901; in use here: {busy}")


@needs_curl
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_without_config_serves_embedded_default(tmp_path, default_ports, sig):
    proc = DefaultConfigProxy(tmp_path)
    try:
        proc.wait_ready()
        curl = subprocess.run(
            ["curl", "-sS", "-i", "--max-time", "5", "http://127.0.0.1:10000/"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert curl.returncode == 0, curl.stderr
        head, _, body = curl.stdout.replace("\r\n", "\n").partition("\n\n")
        assert head.startswith("HTTP/1.1 200"), head
        assert "Welcome to Outrider" in body
        assert "http://127.0.0.1:9901/" in body  # where the admin is
        assert "outrider run -c" in body  # how to pass a config
        status, ready = http_get(f"{proc.admin}/ready")
        assert (status, ready) == (200, "LIVE\n")
        status, info = http_get(f"{proc.admin}/server_info")
        assert json.loads(info)["command_line_options"]["config_path"] == "<embedded default>"
        status, _ = http_get("http://127.0.0.1:10000/elsewhere")
        assert status == 404
    finally:
        started = time.monotonic()
        code = proc.stop(sig, timeout=8)
        elapsed = time.monotonic() - started
    # stop() has closed the log; read what the process wrote.
    output = proc.log_path.read_text(errors="replace")
    assert code == 0, output
    assert elapsed < 3, f"took {elapsed:.1f}s to stop"
    assert "Traceback" not in output
    assert not port_in_use(10000)


# -- extensions --------------------------------------------------------------------


def test_extensions_list_text(tmp_path):
    result = cli("extensions", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CATEGORY", "NAME", "STATUS", "DISTRIBUTION", "VERSION"]
    rows = {(cols[0], cols[1]): cols for cols in (line.split() for line in lines[1:])}
    assert BUILTINS <= set(rows), result.stdout
    for key in BUILTINS:
        assert rows[key][2:] == ["stable", "outrider", outrider.__version__], rows[key]


def test_extensions_list_json(tmp_path):
    result = cli("extensions", "list", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    by_key = {(e["category"], e["name"]): e for e in data}
    assert BUILTINS <= set(by_key)
    router = by_key[("filters.http", "router")]
    assert router["distribution"] == "outrider"
    assert router["version"] == outrider.__version__
    assert router["status"] == "stable"
    assert router["description"]


def test_console_script_is_installed():
    script = shutil.which("outrider") or str(Path(sys.executable).with_name("outrider"))
    if not Path(script).exists():
        pytest.skip("the `outrider` console script is not on PATH")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout.strip()) == (0, f"outrider {outrider.__version__}")


def test_extensions_show_router():
    result = cli("extensions", "show", "router")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    first = out.splitlines()[0]
    assert first.startswith("filters.http/router") and "stable" in first and "outrider" in first
    assert "Routes requests" in out  # the description
    schema_text = out.split("Config schema:\n", 1)[1].split("\nREADME:", 1)[0]
    schema = json.loads(schema_text)
    assert schema["type"] == "object"
    readme = out.split("\nREADME:\n", 1)[1]
    assert readme.lstrip().startswith("#")
    assert "upstream_cx_connect_fail" in readme


@pytest.mark.parametrize(
    "name, hint",
    [("nosuch", "no extension named 'nosuch'"), ("routr", "did you mean 'router'?"), ("codecs/router", "did you mean 'filters.http/router'?")],
)
def test_extensions_show_unknown(name, hint):
    result = cli("extensions", "show", name)
    assert result.returncode != 0
    assert result.stdout == ""
    assert hint in result.stderr
    assert "outrider extensions list" in result.stderr
    assert "Traceback" not in result.stderr


def test_extensions_show_into_a_closed_pipe_is_quiet():
    # The reader has gone before the first write: every write gets EPIPE.
    proc = subprocess.Popen([*CLI, "extensions", "show", "router"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0  # the output was not delivered
    assert err.decode() == ""


@pytest.mark.skipif(shutil.which("head") is None or shutil.which("sh") is None, reason="needs sh and head")
def test_extensions_show_piped_to_head():
    command = " ".join(CLI) + " extensions show router | head -1"
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("filters.http/router")
    assert len(result.stdout.splitlines()) == 1
    assert "BrokenPipeError" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr == ""


# -- graceful stop with connections open ----------------------------------------------


def wait_until(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def drain_config(port: int, upstream_port: int) -> str:
    return f"""
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
                - match: {{prefix: /}}
                  route: {{cluster: backend, timeout: 10s}}
    clusters:
      - name: backend
        endpoints: ["127.0.0.1:{upstream_port}"]
    """


def test_sigterm_closes_idle_keepalive_and_finishes_in_flight(proxy, upstream):
    import socket

    port = free_port()
    proc = proxy.start(drain_config(port, upstream[0]))
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        idle.sendall(b"GET /first HTTP/1.1\r\nhost: t\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        slow.sendall(b"GET /delay/0.8 HTTP/1.1\r\nhost: t\r\n\r\n")
        assert proc.wait_stat("http.web.downstream_rq_active", 1) == 1
        assert proc.wait_stat("cluster.backend.upstream_rq_active", 1) == 1  # at the upstream
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        # While it drains, the admin still answers, and says so.
        assert wait_until(lambda: http_get(f"{proc.admin}/ready", timeout=2) == (503, "DRAINING\n"))
        # The in-flight request still gets its whole answer.
        answer = b""
        while True:
            chunk = slow.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b'"path": "/delay/0.8"' in answer
        # The idle keep-alive connection is closed, not held for the drain timeout.
        assert idle.recv(65536) == b""
        assert proc.proc.wait(5) == 0
        assert time.monotonic() - started < 3
    finally:
        idle.close()
        slow.close()
    assert "Traceback" not in proc.output()


def test_ctrl_c_while_starting_is_quiet(tmp_path):
    # Deterministically "press Ctrl-C" while the extensions load, before the
    # server has installed its own SIGINT handler.
    path = write(tmp_path, valid_config(free_port(), free_port()))
    script = (
        "import sys, outrider.cli as cli\n"
        "def interrupted(*a, **k): raise KeyboardInterrupt\n"
        "cli.load_registry = interrupted\n"
        f"raise SystemExit(cli.main(['run', '-c', {str(path)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 128 + signal.SIGINT
    assert "Traceback" not in result.stderr, result.stderr
