"""The file access logger through the real proxy: real upstreams, real
clients, lines read back from the files the proxy wrote."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import free_port, http_get, raw_exchange, start_raw

FIELDS = (
    "code flags details method path protocol rx tx duration request_duration response_duration "
    "upstream_host cluster route request_id remote user_agent x_upstream start"
).split()
FORMAT = "|".join([
    "%RESPONSE_CODE%", "%RESPONSE_FLAGS%", "%RESPONSE_CODE_DETAILS%", "%REQ(:METHOD)%", "%REQ(:PATH)%", "%PROTOCOL%",
    "%BYTES_RECEIVED%", "%BYTES_SENT%", "%DURATION%", "%REQUEST_DURATION%", "%RESPONSE_DURATION%",
    "%UPSTREAM_HOST%", "%UPSTREAM_CLUSTER%", "%ROUTE_NAME%", "%REQ_ID%", "%DOWNSTREAM_REMOTE_ADDRESS%",
    "%REQ(USER-AGENT)%", "%RESP(X-UPSTREAM)%", "%START_TIME(%s.%3f)%",
])


def wait_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The file's lines once it has at least ``count`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text(encoding="latin-1").splitlines()
            if len(lines) >= count:
                return lines
        time.sleep(0.02)
    raise AssertionError(f"{path}: {len(lines)} lines after {timeout}s, expected {count}: {lines}")


def request(port: int, method: str = "GET", path: str = "/", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, int]:
    """(status, headers, body, the client's local port)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"user-agent": "test-client/1.0", **(headers or {})})
        local_port = conn.sock.getsockname()[1]
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(), local_port
    finally:
        conn.close()


def http_config(port: int, upstream_port: int, access_log: str, dead_port: int | None = None) -> str:
    dead = dead_port or free_port()
    return f"""
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http:
      stat_prefix: web
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - name: app
              match: {{prefix: /app}}
              route: {{cluster: app}}
            - name: slow
              match: {{prefix: /delay}}
              route: {{cluster: app, timeout: 300ms}}
            - name: dead
              match: {{prefix: /dead}}
              route: {{cluster: dead}}
{access_log}
clusters:
  - {{name: app, endpoints: ["127.0.0.1:{upstream_port}"]}}
  - {{name: dead, endpoints: ["127.0.0.1:{dead}"], connect_timeout: 1s}}
"""


def file_log(path: Path, extra: str = "", filter_: str = "") -> str:
    block = f"""      - name: file
        config: {{path: "{path}", flush_interval: 10ms{extra}}}
"""
    if filter_:
        block += f"        filter: {filter_}\n"
    return block


def fields(line: str) -> dict[str, str]:
    values = line.split("|")
    assert len(values) == len(FIELDS), line
    return dict(zip(FIELDS, values))


# -- HTTP, field by field --------------------------------------------------------


def test_lines_for_2xx_404_503_504_and_a_body(proxy, upstream, tmp_path):
    upstream_port, app = upstream
    port, dead = free_port(), free_port()
    custom, default = tmp_path / "custom.log", tmp_path / "default.log"
    access_log = "    access_log:\n" + file_log(custom, f", format: '{FORMAT}'") + file_log(default)
    proc = proxy.start(http_config(port, upstream_port, access_log, dead))

    before = time.time()
    status, headers, body, client_port = request(port, path="/app/ok?x=1")
    assert status == 200
    lines = wait_lines(custom, 1)
    f = fields(lines[0])
    assert (f["code"], f["flags"], f["details"], f["method"], f["path"], f["protocol"]) == \
        ("200", "-", "via_upstream", "GET", "/app/ok?x=1", "HTTP/1.1")
    assert (f["rx"], f["tx"]) == ("0", str(len(body)))
    assert (f["upstream_host"], f["cluster"], f["route"]) == (f"127.0.0.1:{upstream_port}", "app", "app")
    assert f["request_id"] == headers["x-request-id"]
    assert f["remote"] == f"127.0.0.1:{client_port}"
    assert (f["user_agent"], f["x_upstream"]) == ("test-client/1.0", "upstream")
    assert 0 <= int(f["request_duration"]) <= int(f["response_duration"]) <= int(f["duration"]) < 5000
    assert before - 1 <= float(f["start"]) <= time.time()

    # Envoy's default format when none is given.
    (line,) = wait_lines(default, 1)
    m = re.fullmatch(
        r'\[(\S+)\] "GET /app/ok\?x=1 HTTP/1.1" 200 - 0 (\d+) (\d+) (\d+) "-" "test-client/1.0" "(\S+)" "127.0.0.1:(\d+)" "(\S+)"',
        line,
    )
    assert m, line
    start, tx, duration, service_time, rid, authority_port, host = m.groups()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", start)
    assert (int(tx), rid, int(authority_port), host) == (len(body), headers["x-request-id"], port, f"127.0.0.1:{upstream_port}")
    assert service_time == headers["x-envoy-upstream-service-time"]

    # No route: 404 NR, no upstream.
    assert request(port, path="/nowhere")[0] == 404
    f = fields(wait_lines(custom, 2)[1])
    assert (f["code"], f["flags"], f["details"], f["upstream_host"], f["cluster"], f["route"], f["response_duration"]) == \
        ("404", "NR", "route_not_found", "-", "-", "-", "-")

    # A cluster whose host refuses connections: 503 UF.
    assert request(port, path="/dead")[0] == 503
    f = fields(wait_lines(custom, 3)[2])
    assert (f["code"], f["flags"], f["upstream_host"], f["cluster"], f["route"]) == \
        ("503", "UF", f"127.0.0.1:{dead}", "dead", "dead")
    assert f["details"].startswith("upstream_connect_failure")

    # An upstream slower than the route timeout (300ms): 504 UT.
    assert request(port, path="/delay/2")[0] == 504
    f = fields(wait_lines(custom, 4)[3])
    assert (f["code"], f["flags"], f["details"], f["upstream_host"], f["response_duration"]) == \
        ("504", "UT", "upstream_response_timeout", f"127.0.0.1:{upstream_port}", "-")
    assert 300 <= int(f["duration"]) < 2000

    # A request body: BYTES_RECEIVED counts it.
    payload = os.urandom(1234)
    status, _, body, _ = request(port, "POST", "/app/upload", body=payload)
    assert status == 200 and json.loads(body)["body_len"] == 1234
    f = fields(wait_lines(custom, 5)[4])
    assert (f["code"], f["method"], f["rx"], f["tx"]) == ("200", "POST", "1234", str(len(body)))
    assert int(f["request_duration"]) <= int(f["duration"])

    assert proc.stat("access_logs.file.write_failed") == 0
    assert proc.stat("access_logs.file.dropped") == 0


def test_a_refused_request_head_is_logged_with_dpe(proxy, upstream, tmp_path):
    """Smuggling shapes and oversized heads never become streams; they are
    still logged: the codec's status, flag DPE, its reason, no upstream."""
    port = free_port()
    custom = tmp_path / "custom.log"
    access_log = "    access_log:\n" + file_log(custom, f", format: '{FORMAT}'")
    proc = proxy.start(http_config(port, upstream[0], access_log))

    smuggled = (b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert raw_exchange(port, smuggled).startswith(b"HTTP/1.1 400 ")
    too_many = b"GET /app HTTP/1.1\r\nHost: x\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    assert raw_exchange(port, too_many).startswith(b"HTTP/1.1 431 ")

    first, second = (fields(line) for line in wait_lines(custom, 2))
    for f, code in ((first, "400"), (second, "431")):
        assert (f["code"], f["flags"], f["method"], f["path"], f["protocol"]) == (code, "DPE", "-", "-", "-")
        assert f["details"].startswith("http1.")
        assert (f["upstream_host"], f["cluster"], f["route"], f["request_id"]) == ("-", "-", "-", "-")
        assert re.fullmatch(r"127\.0\.0\.1:\d+", f["remote"])
        assert int(f["tx"]) > 0
    assert proc.stat("http.web.downstream_cx_protocol_error") == 2


def test_json_format_lines_parse_with_typed_values(proxy, upstream, tmp_path):
    upstream_port, _ = upstream
    port = free_port()
    path = tmp_path / "access.json"
    json_format = (
        '{start: "%START_TIME%", method: "%REQ(:METHOD)%", path: "%REQ(:PATH)%", status: "%RESPONSE_CODE%", '
        'flags: "%RESPONSE_FLAGS%", bytes: {in: "%BYTES_RECEIVED%", out: "%BYTES_SENT%"}, duration: "%DURATION%", '
        'upstream: "%UPSTREAM_HOST%", summary: "%REQ(:METHOD)% %RESPONSE_CODE%", edge: "yes", ua: "%REQ(user-agent):4%"}'
    )
    proxy.start(http_config(port, upstream_port, "    access_log:\n" + file_log(path, f", json_format: {json_format}")))
    assert request(port, "POST", "/app/x", body=b"abc")[0] == 200
    assert request(port, path="/missing")[0] == 404
    first, second = (json.loads(line) for line in wait_lines(path, 2))
    assert first["method"] == "POST" and first["path"] == "/app/x" and first["status"] == 200
    assert first["bytes"]["in"] == 3 and isinstance(first["bytes"]["out"], int) and first["bytes"]["out"] > 0
    assert isinstance(first["duration"], int) and first["flags"] is None
    assert first["upstream"] == f"127.0.0.1:{upstream_port}"
    assert (first["summary"], first["edge"], first["ua"]) == ("POST 200", "yes", "test")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["start"])
    assert (second["status"], second["flags"], second["upstream"]) == (404, "NR", None)


# -- filters ----------------------------------------------------------------------


def test_filters_errors_only_and_sampling(proxy, upstream, tmp_path):
    upstream_port, _ = upstream
    port = free_port()
    errors, everything, nothing = tmp_path / "errors.log", tmp_path / "all.log", tmp_path / "none.log"
    fmt = ", format: '%RESPONSE_CODE% %REQ(:PATH)%'"
    access_log = (
        "    access_log:\n"
        + file_log(errors, fmt, "{status_code: {ge: 400}}")
        + file_log(everything, fmt, "{sampling: 100}")
        + file_log(nothing, fmt, "{sampling: 0}")
    )
    proxy.start(http_config(port, upstream_port, access_log))
    assert request(port, path="/app/a")[0] == 200
    assert request(port, path="/nope")[0] == 404
    assert request(port, path="/dead")[0] == 503
    assert request(port, path="/app/b")[0] == 200
    assert wait_lines(everything, 4) == ["200 /app/a", "404 /nope", "503 /dead", "200 /app/b"]
    assert wait_lines(errors, 2) == ["404 /nope", "503 /dead"]
    time.sleep(0.2)  # several flush intervals: a sampled-out line would have been written by now
    assert wait_lines(errors, 2) == ["404 /nope", "503 /dead"]
    assert not nothing.exists()


def test_duration_health_check_and_header_filters_through_the_proxy(proxy, upstream, tmp_path):
    """One logger per filter kind, one request per case: each file gets
    exactly the lines its filter lets through."""
    upstream_port, _ = upstream
    port = free_port()
    filters = {
        "slow": "{duration: {ge: 250ms}}",
        "no_hc": "{not_health_check: true}",
        "canary": "{header: {name: x-canary, exact: '1'}}",
        "no_canary_header": "{header: {name: x-canary, present: true, invert_match: true}}",
        "fast_tests": "{duration: {le: 250ms}, not_health_check: true, header: {name: user-agent, prefix: test-}}",
    }
    fmt = ", format: '%REQ(:PATH)%'"
    access_log = "    access_log:\n" + "".join(file_log(tmp_path / f"{name}.log", fmt, f) for name, f in filters.items())
    proc = proxy.start(f"""
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http:
      stat_prefix: web
      virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: app}}}}]}}]
{access_log}
clusters:
  - {{name: app, endpoints: ["127.0.0.1:{upstream_port}"]}}
""")
    assert request(port, path="/fast")[0] == 200
    assert request(port, path="/hc", headers={"user-agent": "Envoy/HC"})[0] == 200
    assert request(port, path="/delay/0.3")[0] == 200
    assert request(port, path="/canary", headers={"x-canary": "1"})[0] == 200
    assert request(port, path="/canary-off", headers={"x-canary": "0"})[0] == 200
    assert proc.wait_stat("http.web.downstream_rq_completed", 5) == 5
    expected = {
        "slow": ["/delay/0.3"],
        "no_hc": ["/fast", "/delay/0.3", "/canary", "/canary-off"],
        "canary": ["/canary"],
        "no_canary_header": ["/fast", "/hc", "/delay/0.3"],
        "fast_tests": ["/fast", "/canary", "/canary-off"],
    }
    for name, lines in expected.items():
        assert wait_lines(tmp_path / f"{name}.log", len(lines)) == lines, name
    time.sleep(0.1)  # several flush intervals: a line that should not be there would be by now
    for name, lines in expected.items():
        assert (tmp_path / f"{name}.log").read_text().splitlines() == lines, name


def test_many_streams_every_line_in_order_and_two_loggers_share_a_file(proxy, upstream, tmp_path):
    """Lines are rendered in batches of streams: more streams than one batch
    all come out, in order, with their own durations; two loggers on one
    file keep the order the streams ended in."""
    upstream_port, _ = upstream
    port = free_port()
    single, shared = tmp_path / "single.log", tmp_path / "shared.log"
    access_log = (
        "    access_log:\n"
        # An hour's flush interval: only full batches are rendered until shutdown.
        + f"""      - name: file
        config: {{path: "{single}", flush_interval: 1h, format: '%REQ(:PATH)% %RESPONSE_CODE% %DURATION%'}}
"""
        + file_log(shared, ", format: 'A %REQ(:PATH)%'")
        + file_log(shared, ", format: 'B %REQ(:PATH)%'")
    )
    proc = proxy.start(http_config(port, upstream_port, access_log))
    count = 700  # many render batches (64 streams each)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for i in range(count):
            conn.request("GET", f"/app/{i}")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        conn.close()
    assert wait_lines(shared, 2 * count) == [f"{logger} /app/{i}" for i in range(count) for logger in "AB"]
    assert not single.exists()
    assert proc.stop() == 0
    lines = single.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [[f"/app/{i}", "200"] for i in range(count)]
    assert all(int(line.split()[2]) < 1000 for line in lines)  # taken when the stream ended, not at render


# -- rotation, failures, shutdown -----------------------------------------------


def test_sigusr1_reopens_the_file_for_rotation(proxy, upstream, tmp_path):
    upstream_port, _ = upstream
    port = free_port()
    path = tmp_path / "access.log"
    proc = proxy.start(http_config(port, upstream_port, "    access_log:\n" + file_log(path, ", format: '%REQ(:PATH)%'")))
    assert request(port, path="/app/before")[0] == 200
    assert wait_lines(path, 1) == ["/app/before"]
    rotated = tmp_path / "access.log.1"
    path.rename(rotated)
    proc.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while not path.exists():  # reopening creates the new file
        assert time.monotonic() < deadline, "the log file was not reopened"
        time.sleep(0.02)
    assert request(port, path="/app/after")[0] == 200
    assert wait_lines(path, 1) == ["/app/after"]
    assert rotated.read_text().splitlines() == ["/app/before"]
    assert "reopening access logs" in proc.output()


def test_unwritable_file_and_full_disk_cost_stats_not_requests(proxy, upstream, tmp_path):
    upstream_port, _ = upstream
    port = free_port()
    directory = tmp_path / "a-directory"
    directory.mkdir()
    access_log = "    access_log:\n" + file_log(directory) + file_log(Path("/dev/full"))
    proc = proxy.start(http_config(port, upstream_port, access_log))
    for _ in range(3):
        status, _, body, _ = request(port, path="/app/x")
        assert status == 200 and json.loads(body)["path"] == "/app/x"
    assert proc.wait_stat("access_logs.file.write_failed", 2) >= 2
    assert proc.wait_stat("access_logs.file.dropped", 6) >= 6
    output = proc.output()
    assert f"cannot open {directory}" in output
    assert "cannot write to /dev/full" in output
    assert output.count(f"cannot open {directory}") == 1  # rate-limited, not one line per batch
    assert proc.stat("http.web.downstream_rq_2xx") == 3


def test_stdout_and_lines_pending_at_shutdown_are_written(proxy, upstream, tmp_path):
    upstream_port, _ = upstream
    port = free_port()
    path = tmp_path / "late.log"
    access_log = (
        "    access_log:\n"
        + file_log(Path("/dev/stdout"), ", format: 'STDOUT-LINE %RESPONSE_CODE% %REQ(:PATH)%'")
        + f"""      - name: file
        config: {{path: "{path}", flush_interval: 1h, format: '%REQ(:PATH)%'}}
"""
    )
    proc = proxy.start(http_config(port, upstream_port, access_log))
    assert request(port, path="/app/stdout")[0] == 200
    deadline = time.monotonic() + 5
    while "STDOUT-LINE 200 /app/stdout" not in proc.output():
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.02)
    assert not path.exists()  # still waiting for its (hour-long) flush interval
    assert proc.stop() == 0
    assert path.read_text() == "/app/stdout\n"


def test_dev_stderr_is_the_proxys_stderr(proxy, upstream, tmp_path):
    """Run with stdout and stderr apart: the line is on stderr only."""
    upstream_port, _ = upstream
    port = free_port()
    config, admin_port = proxy.config(http_config(port, upstream_port, "    access_log:\n" + file_log(
        Path("/dev/stderr"), ", format: 'STDERR-LINE %RESPONSE_CODE% %REQ(:PATH)%'")), name="stderr.yaml")
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "outrider", "run", "-c", str(config)], stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 15
        while http_get_status(f"http://127.0.0.1:{admin_port}/ready") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        assert request(port, path="/app/err")[0] == 200
        deadline = time.monotonic() + 5
        while "STDERR-LINE 200 /app/err\n" not in err_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.02)
        assert "STDERR-LINE" not in out_path.read_text(errors="replace")
    finally:
        proc.terminate()
        proc.wait(10)


def http_get_status(url: str) -> int:
    """The status of GET ``url``; 0 while nothing answers."""
    try:
        return http_get(url, timeout=1.0)[0]
    except OSError:
        return 0


# -- validation -------------------------------------------------------------------


def test_validate_points_at_an_unknown_operator(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "listeners:\n"
        "  - name: web\n"
        "    address: 127.0.0.1:10000\n"
        "    http:\n"
        "      stat_prefix: web\n"
        "      virtual_hosts: [{name: all, domains: ['*'], routes: [{match: {prefix: /}, direct_response: {status: 200}}]}]\n"
        "    access_log:\n"
        "      - name: file\n"
        "        config:\n"
        "          path: /tmp/never-written.log\n"
        "          format: \"%START_TIME% %REQ(:PATH)% %UPSTREAM_HOSTNAME% %DURATION%\"\n"
    )
    result = subprocess.run([sys.executable, "-m", "outrider", "validate", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    column = config.read_text().splitlines()[10].index("%UPSTREAM_HOSTNAME%") + 1
    assert (f"{config}:11:{column}: listeners[0].access_log[0].config.format: "
            "unknown command operator %UPSTREAM_HOSTNAME% (did you mean %UPSTREAM_HOST%?)") in result.stderr
    assert "nothing started" in result.stderr

    # Fixed, it validates, and validating (which builds every object) opens no file.
    target = tmp_path / "access.log"
    config.write_text(config.read_text().replace("%UPSTREAM_HOSTNAME%", "%UPSTREAM_HOST%")
                      .replace("/tmp/never-written.log", str(target)))
    result = subprocess.run([sys.executable, "-m", "outrider", "validate", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not target.exists()


# -- TCP -----------------------------------------------------------------------------


def test_tcp_listener_logs_each_connection(proxy, tmp_path):
    def answer(data: bytes, transport) -> None:
        transport.write(b"world!!")
        transport.close()

    server, upstream_port, received = start_raw(answer)
    port, dead_listener, dead = free_port(), free_port(), free_port()
    path = tmp_path / "tcp.log"
    fmt = ("%BYTES_RECEIVED%|%BYTES_SENT%|%DURATION%|%UPSTREAM_HOST%|%UPSTREAM_CLUSTER%|%RESPONSE_FLAGS%|"
           "%DOWNSTREAM_REMOTE_ADDRESS%|%RESPONSE_CODE%|%PROTOCOL%|%START_TIME%")
    try:
        proxy.start(f"""
listeners:
  - name: pg
    address: 127.0.0.1:{port}
    tcp: {{cluster: backend}}
    access_log:
{file_log(path, f", format: '{fmt}'")}
  - name: broken
    address: 127.0.0.1:{dead_listener}
    tcp: {{cluster: nowhere}}
    access_log:
{file_log(path, f", format: '{fmt}'")}
clusters:
  - {{name: backend, endpoints: ["127.0.0.1:{upstream_port}"]}}
  - {{name: nowhere, endpoints: ["127.0.0.1:{dead}"]}}
""")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            client_port = s.getsockname()[1]
            s.sendall(b"hello")
            reply = b""
            while chunk := s.recv(1024):
                reply += chunk
        assert reply == b"world!!"
        (line,) = wait_lines(path, 1)
        rx, tx, duration, host, cluster, flags, remote, code, protocol, start = line.split("|")
        assert (rx, tx, host, cluster, flags, remote, code, protocol) == \
            ("5", "7", f"127.0.0.1:{upstream_port}", "backend", "-", f"127.0.0.1:{client_port}", "0", "-")
        assert 0 <= int(duration) < 5000
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", start)

        with socket.create_connection(("127.0.0.1", dead_listener), timeout=5) as s:
            assert s.recv(1024) == b""  # closed: the upstream refused
        line = wait_lines(path, 2)[1]
        rx, tx, _, host, cluster, flags, *_ = line.split("|")
        assert (rx, tx, host, cluster, flags) == ("0", "0", f"127.0.0.1:{dead}", "nowhere", "UF,URX")
    finally:
        server.stop()


def test_a_stuck_file_never_blocks_requests_and_the_buffer_is_bounded(proxy, upstream, tmp_path):
    """A FIFO nobody reads: the writer thread blocks opening it. Requests are
    served regardless; past max_buffer_bytes, lines are dropped and counted."""
    upstream_port, _ = upstream
    port = free_port()
    fifo = tmp_path / "stuck.fifo"
    os.mkfifo(fifo)
    line_format = "x" * 200 + " %REQ(:PATH)%"
    proc = proxy.start(http_config(port, upstream_port, "    access_log:\n" + file_log(
        fifo, f", format: '{line_format}', max_buffer_bytes: 4096")))
    started = time.monotonic()
    for i in range(40):
        assert request(port, path=f"/app/{i}")[0] == 200
        time.sleep(0.015)  # a flush interval between requests: many small batches
    assert time.monotonic() - started < 10
    assert proc.wait_stat("access_logs.file.dropped", 20) >= 20
    dropped = proc.stat("access_logs.file.dropped")
    assert 0 < proc.stat("access_logs.file.write_total_buffered") <= 4096
    # A reader comes: what was kept is written, in order.
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        data = b""
        deadline = time.monotonic() + 5
        while proc.stat("access_logs.file.write_completed") < 1 or proc.stat("access_logs.file.write_total_buffered"):
            assert time.monotonic() < deadline
            try:
                data += os.read(fd, 65536)
            except BlockingIOError:
                time.sleep(0.02)
        try:
            data += os.read(fd, 65536)
        except BlockingIOError:
            pass
    finally:
        os.close(fd)
    lines = data.decode().splitlines()
    assert 0 < len(lines) == 40 - dropped
    paths = [line.split()[1] for line in lines]
    assert paths == sorted(paths, key=lambda p: int(p.rsplit("/", 1)[1]))




# -- response flags through the proxy --------------------------------------------


def _trickle(transport: asyncio.Transport, left: int) -> None:
    """One more chunk every 50 ms while the connection is open."""
    if left and not transport.is_closing():
        transport.write(b"5\r\nmore!\r\n")
        asyncio.get_running_loop().call_later(0.05, _trickle, transport, left - 1)


def scripted_upstream(data: bytes, transport: asyncio.Transport) -> None:
    """A raw upstream whose behaviour the request path picks: ``/hold`` never
    answers; ``/close`` closes before answering; ``/truncated`` sends a head
    promising 100 bytes, 10 of them, and closes; ``/trickle`` streams a
    chunked body, a chunk every 50 ms; ``/busy`` answers 503; ``/trailer``
    a chunked 200 with trailers."""
    if not data.startswith(b"GET "):
        return
    path = data.split(b" ", 2)[1]
    if path.startswith(b"/close"):
        transport.close()
    elif path.startswith(b"/truncated"):
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        transport.close()
    elif path.startswith(b"/trickle"):
        transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        asyncio.get_running_loop().call_later(0.05, _trickle, transport, 100)
    elif path.startswith(b"/busy"):
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
    elif path.startswith(b"/trailer"):
        transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: grpc-status, grpc-message\r\n\r\n"
                        b"2\r\nok\r\n0\r\ngrpc-status: 0\r\ngrpc-message: all fine\r\n\r\n")
    # /hold: nothing, ever


FLAGS_FORMAT = "%REQ(:PATH)%|%RESPONSE_CODE%|%RESPONSE_FLAGS%|%RESPONSE_CODE_DETAILS%|%BYTES_SENT%|%UPSTREAM_CLUSTER%"


def flags_config(port: int, upstream_port: int, path: Path, dead_port: int, line_format: str = FLAGS_FORMAT) -> str:
    """Routes by prefix to clusters that all point at the scripted upstream
    (``dead`` at a port that refuses), with different circuit breakers and
    retry policies."""
    routes = [
        ("/limited", "limited", ""), ("/queued", "queued", ""),
        ("/busy/urx", "retry_5xx", ", retry_policy: {retry_on: [5xx], num_retries: 1}"),
        ("/busy/breaker", "no_retries_left", ", retry_policy: {retry_on: [5xx], num_retries: 1}"),
        ("/close/urx", "retry_reset", ", retry_policy: {retry_on: [reset], num_retries: 1}"),
        ("/dead/urx", "dead", ", retry_policy: {retry_on: [connect-failure], num_retries: 1}"),
        ("/", "plain", ""),
    ]
    clusters = {
        "limited": "{max_requests: 1}", "queued": "{max_connections: 1, max_pending_requests: 1}",
        "retry_5xx": "{}", "no_retries_left": "{max_retries: 0}", "retry_reset": "{}", "plain": "{}",
    }
    return f"""
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http:
      stat_prefix: web
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
""" + "".join(
        f"            - {{match: {{prefix: {prefix}}}, route: {{cluster: {cluster}, timeout: 10s{extra}}}}}\n"
        for prefix, cluster, extra in routes
    ) + "    access_log:\n" + file_log(path, f", format: '{line_format}'") + "clusters:\n" + "".join(
        f"  - {{name: {name}, endpoints: ['127.0.0.1:{upstream_port}'], circuit_breakers: {breakers}}}\n"
        for name, breakers in clusters.items()
    ) + f"  - {{name: dead, endpoints: ['127.0.0.1:{dead_port}']}}\n"


def send_get(port: int, path: str) -> socket.socket:
    """A client connection that has sent ``GET path``; the caller reads or closes it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def abort(sock: socket.socket) -> None:
    """Close with a TCP reset, as a client that gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_until(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def logged_by_path(path: Path, count: int) -> dict[str, list[str]]:
    """The FLAGS_FORMAT lines, by request path (each path is used once)."""
    lines = wait_lines(path, count)
    by_path = {line.split("|")[0]: line.split("|")[1:] for line in lines}
    assert len(lines) == len(by_path) == count, lines
    return by_path


@pytest.fixture
def scripted():
    server, port, received = start_raw(scripted_upstream)
    yield port, received
    server.stop()


def test_response_flags_uo_dc_and_urx_through_the_proxy(proxy, scripted, tmp_path):
    upstream_port, received = scripted
    port = free_port()
    path = tmp_path / "flags.log"
    proc = proxy.start(flags_config(port, upstream_port, path, free_port()))

    def reached(p: str) -> bool:
        return any(f"GET {p} ".encode() in data for data in received)

    # UO, max_requests: one request in flight (held by the upstream), the next refused.
    held = [send_get(port, "/limited/hold")]
    wait_until(lambda: reached("/limited/hold"), "the upstream got /limited/hold")
    assert request(port, path="/limited/refused")[0] == 503
    # UO, pending overflow: one request on the only connection, one waiting for it, the third refused.
    held.append(send_get(port, "/queued/hold-1"))
    wait_until(lambda: reached("/queued/hold-1"), "the upstream got /queued/hold-1")
    held.append(send_get(port, "/queued/hold-2"))
    wait_until(lambda: proc.stat("cluster.queued.upstream_rq_pending_active") == 1, "/queued/hold-2 waits")
    assert request(port, path="/queued/refused")[0] == 503
    # DC before any response: the waiting clients give up (reset); their upstream requests are cancelled.
    for sock in held:
        abort(sock)
    wait_until(lambda: proc.stat("cluster.queued.upstream_rq_cancelled") == 2, "queued requests cancelled")
    # DC mid-response: the upstream streams slowly, the client reads the first chunk and leaves.
    with send_get(port, "/trickle") as sock:
        got = b""
        while b"first" not in got:
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
    # URX: the policy would retry the second 503 too, but no retry is left.
    assert request(port, path="/busy/urx")[0] == 503
    # UO: the retry is refused by the cluster's max_retries breaker (0).
    assert request(port, path="/busy/breaker")[0] == 503

    logged = logged_by_path(path, 8)
    assert logged["/limited/refused"] == ["503", "UO", "upstream_max_requests_overflow", "18", "limited"]
    assert logged["/queued/refused"] == ["503", "UO", "upstream_overflow", "18", "queued"]
    for hold, cluster in (("/limited/hold", "limited"), ("/queued/hold-1", "queued"), ("/queued/hold-2", "queued")):
        assert logged[hold] == ["0", "DC", "downstream_remote_disconnect", "0", cluster], hold
    code, flags, details, tx, cluster = logged["/trickle"]
    assert (code, flags, details, cluster) == ("200", "DC", "downstream_remote_disconnect", "plain")
    assert int(tx) >= 5  # "first", and maybe more chunks before the proxy saw the client gone
    assert logged["/busy/urx"] == ["503", "URX", "via_upstream", "4", "retry_5xx"]
    assert logged["/busy/breaker"] == ["503", "UO", "via_upstream", "4", "no_retries_left"]

    stats = proc.stats()
    # Envoy counts a max_requests refusal as a pending overflow too.
    assert stats["cluster.limited.upstream_rq_pending_overflow"] == 1
    assert stats["cluster.limited.upstream_rq_cancelled"] == 1
    assert stats["cluster.queued.upstream_rq_pending_overflow"] == 1
    assert (stats["cluster.retry_5xx.upstream_rq_retry"], stats["cluster.retry_5xx.upstream_rq_retry_limit_exceeded"],
            stats["cluster.retry_5xx.upstream_rq_503"]) == (1, 1, 2)
    assert (stats["cluster.no_retries_left.upstream_rq_retry_overflow"], stats["cluster.no_retries_left.upstream_rq_retry"],
            stats["cluster.no_retries_left.upstream_rq_retry_limit_exceeded"], stats["cluster.no_retries_left.upstream_rq_503"]) == \
        (1, 0, 0, 1)
    assert stats["cluster.plain.upstream_rq_retry_limit_exceeded"] == 0
    assert stats["http.web.downstream_rq_rx_reset"] == 4


def test_an_upstream_closing_early_is_uc(proxy, scripted, tmp_path):
    upstream_port, _ = scripted
    port = free_port()
    path = tmp_path / "flags.log"
    proc = proxy.start(flags_config(port, upstream_port, path, free_port()))
    # Before answering: 502, as the router README's table says.
    assert request(port, path="/close/now")[0] == 502
    # After the head and 10 of the 100 bytes it promised: the client's connection is cut.
    reply = raw_exchange(port, b"GET /truncated HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\n0123456789")
    logged = logged_by_path(path, 2)
    assert logged["/truncated"][:2] == ["200", "UC"] and logged["/truncated"][3] == "10"
    assert logged["/truncated"][2].startswith("upstream_reset_after_response_started")
    assert logged["/close/now"][:2] == ["502", "UC"]
    assert logged["/close/now"][2].startswith("upstream_reset_before_response_started")
    assert proc.stat("cluster.plain.upstream_cx_protocol_error") == 0
    assert proc.stat("cluster.plain.upstream_rq_rx_reset") == 2


def test_urx_on_used_up_retries_of_resets_and_connect_failures(proxy, scripted, tmp_path):
    upstream_port, received = scripted
    port, dead = free_port(), free_port()
    path = tmp_path / "flags.log"
    proc = proxy.start(flags_config(port, upstream_port, path, dead))
    assert request(port, path="/close/urx")[0] == 502
    assert request(port, path="/dead/urx")[0] == 503
    logged = logged_by_path(path, 2)
    # Compared as sets here: their order is the subject of the next test.
    code, flags, details, _, cluster = logged["/close/urx"]
    assert (code, cluster) == ("502", "retry_reset") and "URX" in flags.split(",") and len(flags.split(",")) == 2
    code, flags, details, _, cluster = logged["/dead/urx"]
    assert (code, set(flags.split(",")), cluster) == ("503", {"UF", "URX"}, "dead")
    assert details.startswith("upstream_connect_failure")
    assert sum(data.count(b"GET /close/urx ") for data in received) == 2
    stats = proc.stats()
    assert (stats["cluster.retry_reset.upstream_rq_retry"], stats["cluster.retry_reset.upstream_rq_retry_limit_exceeded"]) == (1, 1)
    assert (stats["cluster.dead.upstream_rq_retry"], stats["cluster.dead.upstream_rq_retry_limit_exceeded"],
            stats["cluster.dead.upstream_cx_connect_fail"]) == (1, 1, 2)


def test_urx_comes_after_the_failure_flag_as_in_envoy_and_tcp_proxy(proxy, scripted, tmp_path):
    port = free_port()
    path = tmp_path / "flags.log"
    proxy.start(flags_config(port, scripted[0], path, free_port()))
    assert request(port, path="/dead/urx")[0] == 503
    assert logged_by_path(path, 1)["/dead/urx"][:2] == ["503", "UF,URX"]


def test_trailer_operator_logs_the_upstream_response_trailers(proxy, scripted, tmp_path):
    port = free_port()
    path = tmp_path / "trailers.log"
    line_format = ("%REQ(:PATH)%|%RESPONSE_CODE%|%TRAILER(grpc-status)%|%TRAILER(GRPC-MESSAGE)%|%TRAILER(grpc-message):3%|"
                   "%TRAILER(x-none?grpc-status)%|%TRAILER(x-none)%|%RESP(grpc-status)%")
    proxy.start(flags_config(port, scripted[0], path, free_port(), line_format))
    reply = raw_exchange(port, b"GET /trailer HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
    # The client got them too, after the body.
    assert reply.endswith(b"\r\n2\r\nok\r\n0\r\ngrpc-status: 0\r\ngrpc-message: all fine\r\n\r\n"), reply
    # A response without trailers: every TRAILER operator prints "-".
    assert request(port, path="/busy/plain")[0] == 503
    first, second = wait_lines(path, 2)
    assert first == "/trailer|200|0|all fine|all|0|-|-"
    assert second == "/busy/plain|503|-|-|-|-|-|-"
