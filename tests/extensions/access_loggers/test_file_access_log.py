"""The file access logger through the real proxy: real upstreams, real
clients, lines read back from the files the proxy wrote."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import free_port, raw_exchange, start_raw

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
