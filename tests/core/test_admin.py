"""The admin interface of a real proxy process, with real upstream traffic:
readiness and health-check failing, stats (text, filtered, JSON), clusters,
config_dump, server_info, listeners, extensions, methods, quitquitquit."""

from __future__ import annotations

import json
import re
import socket

import pytest

import outrider
from support import free_port, http_get, port_in_use, wait_for


def admin_config(port: int, upstream_port: int, dead_port: int) -> str:
    return f"""
listeners:
  - name: ingress
    address: 127.0.0.1:{port}
    http:
      stat_prefix: ingress
      filters: [router]
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /dead}}
              route: {{cluster: dead}}
            - match: {{prefix: /}}
              route: {{cluster: backend}}
clusters:
  - name: backend
    endpoints: ["127.0.0.1:{upstream_port}"]
  - name: dead
    endpoints: ["127.0.0.1:{dead_port}"]
    connect_timeout: 2s
    circuit_breakers: {{max_connections: 7, max_retries: 0}}
"""


@pytest.fixture
def running(proxy, upstream):
    port = free_port()
    upstream_port, app = upstream
    dead_port = free_port()  # nothing listens there: every connect is refused
    proc = proxy.start(admin_config(port, upstream_port, dead_port))
    return proc, port, upstream_port, dead_port


def request(port: int, path: str, sock: socket.socket | None = None) -> tuple[int, bytes]:
    """One keep-alive HTTP/1.1 GET on ``sock`` (or a fresh connection closed
    after it); returns the status and the body."""
    own = sock is None
    if own:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, body
            body += chunk
        return status, body
    finally:
        if own:
            sock.close()


def parse_stats_text(body: str) -> dict[str, int]:
    stats = {}
    for line in body.splitlines():
        if re.search(r": (P0\(|No recorded values$)", line):
            continue  # a histogram (Envoy lists them after the counters and gauges)
        name, sep, value = line.rpartition(": ")
        assert sep and re.fullmatch(r"-?\d+", value), f"not a `name: value` line: {line!r}"
        assert name not in stats, f"{name} listed twice"
        stats[name] = int(value)
    return stats



def test_stats_count_real_traffic(running):
    proc, port, upstream_port, dead_port = running
    keep = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        assert request(port, "/ok", keep)[0] == 200
        assert request(port, "/status/404", keep)[0] == 404
        assert request(port, "/status/500")[0] == 500
        status, body = request(port, "/dead/x")
        assert status == 503, body

        # The keep-alive connection is still open, and so (pooled) is the
        # upstream connection behind it.
        assert wait_for(lambda: proc.stat("http.ingress.downstream_rq_total") == 4)
        status, text = http_get(f"{proc.admin}/stats")
        assert status == 200
        stats = parse_stats_text(text)
        assert list(stats) == sorted(stats)
        assert stats["http.ingress.downstream_rq_total"] == 4
        assert stats["http.ingress.downstream_rq_2xx"] == 1
        assert stats["http.ingress.downstream_rq_4xx"] == 1
        assert stats["http.ingress.downstream_rq_5xx"] == 2
        assert stats["http.ingress.downstream_cx_active"] == 1
        assert stats[f"listener.127.0.0.1:{port}.downstream_cx_active"] == 1
        assert stats["cluster.backend.upstream_rq_total"] == 3
        assert stats["cluster.backend.upstream_rq_2xx"] == 1
        assert stats["cluster.backend.upstream_rq_4xx"] == 1
        assert stats["cluster.backend.upstream_rq_5xx"] == 1
        assert stats["cluster.backend.upstream_cx_active"] >= 1
        assert stats["cluster.backend.upstream_cx_connect_fail"] == 0
        assert stats["cluster.dead.upstream_cx_connect_fail"] == 1
        assert stats["cluster.dead.upstream_cx_active"] == 0
        assert stats["server.live"] == 1

        # The JSON form is the same snapshot, in another shape.
        assert proc.stats()["http.ingress.downstream_rq_total"] == 4

        # /clusters shows the host's live connection and health.
        status, text = http_get(f"{proc.admin}/clusters")
        assert status == 200
        host = f"backend::127.0.0.1:{upstream_port}"
        assert f"{host}::health_flags::healthy" in text.splitlines()
        assert re.search(rf"(?m)^{re.escape(host)}::cx_active::[1-9]\d*$", text), text
        lines = text.splitlines()
        assert f"dead::127.0.0.1:{dead_port}::cx_active::0" in lines
        # Cluster-level lines, as in Envoy: the stats name and the circuit breakers.
        assert "backend::observability_name::backend" in lines
        assert "backend::default_priority::max_connections::1024" in lines
        assert "dead::default_priority::max_connections::7" in lines
        assert "dead::default_priority::max_retries::0" in lines
    finally:
        keep.close()
    assert wait_for(lambda: proc.stat("http.ingress.downstream_cx_active") == 0)


def test_stats_filter_usedonly_and_format(running):
    proc, port, *_ = running
    assert request(port, "/")[0] == 200
    assert proc.wait_stat("cluster.backend.upstream_rq_2xx", 1) == 1

    status, text = http_get(f"{proc.admin}/stats?filter=^cluster\\.backend\\.upstream_rq_")
    assert status == 200
    stats = parse_stats_text(text)
    assert stats and all(name.startswith("cluster.backend.upstream_rq_") for name in stats)
    assert stats["cluster.backend.upstream_rq_total"] == 1

    status, text = http_get(f"{proc.admin}/stats?usedonly&filter=^cluster\\.")
    stats = parse_stats_text(text)
    assert stats["cluster.backend.upstream_rq_2xx"] == 1
    assert all(value != 0 for value in stats.values()), stats
    assert "cluster.dead.upstream_cx_connect_fail" not in stats

    status, body = http_get(f"{proc.admin}/stats?format=json&filter=downstream_rq_total$")
    assert status == 200
    names = {s["name"]: s["value"] for s in json.loads(body)["stats"]}
    assert names == {"http.ingress.downstream_rq_total": 1}

    assert http_get(f"{proc.admin}/stats?filter=(unclosed")[0] == 400
    assert http_get(f"{proc.admin}/stats?format=yaml")[0] == 400


def test_ready_follows_healthcheck_fail_and_ok(running):
    proc, port, *_ = running
    assert http_get(f"{proc.admin}/ready") == (200, "LIVE\n")

    assert http_get(f"{proc.admin}/healthcheck/fail", method="POST") == (200, "OK\n")
    # As in Envoy: a failed health check reports DRAINING so that load
    # balancers take the proxy out, while it keeps serving traffic.
    assert http_get(f"{proc.admin}/ready") == (503, "DRAINING\n")
    assert json.loads(http_get(f"{proc.admin}/server_info")[1])["state"] == "DRAINING"
    assert request(port, "/still-serving")[0] == 200

    assert http_get(f"{proc.admin}/healthcheck/ok", method="POST") == (200, "OK\n")
    assert http_get(f"{proc.admin}/ready") == (200, "LIVE\n")
    assert json.loads(http_get(f"{proc.admin}/server_info")[1])["state"] == "LIVE"
    # HEAD, which some probes send, answers like GET.
    assert http_get(f"{proc.admin}/ready", method="HEAD") == (200, "")


def test_read_only_endpoints(running):
    proc, port, upstream_port, dead_port = running

    status, body = http_get(f"{proc.admin}/config_dump")
    assert status == 200
    dump = json.loads(body)
    assert dump["source"] == str(proc.config_path)
    listener = dump["config"]["listeners"][0]
    assert (listener["name"], listener["address"]) == ("ingress", f"127.0.0.1:{port}")
    assert [c["name"] for c in dump["config"]["clusters"]] == ["backend", "dead"]

    status, body = http_get(f"{proc.admin}/server_info")
    assert status == 200
    info = json.loads(body)
    assert info["version"] == outrider.__version__
    assert info["state"] == "LIVE"
    assert info["pid"] == proc.proc.pid
    assert info["uptime_current_epoch"] >= 0
    assert info["command_line_options"]["config_path"] == str(proc.config_path)
    assert info["event_loop"] == "uvloop"  # a dependency on Linux, used unless --no-uvloop

    status, body = http_get(f"{proc.admin}/listeners")
    assert (status, body) == (200, f"ingress::127.0.0.1:{port}\n")
    status, body = http_get(f"{proc.admin}/listeners?format=json")
    [ls] = json.loads(body)["listener_statuses"]
    assert ls["name"] == "ingress" and ls["protocol"] == "http"
    assert ls["local_address"] == f"127.0.0.1:{port}"

    status, body = http_get(f"{proc.admin}/clusters?format=json")
    assert status == 200
    clusters = {c["name"]: c for c in json.loads(body)["cluster_statuses"]}
    assert set(clusters) == {"backend", "dead"}
    [host] = clusters["backend"]["host_statuses"]
    assert host["address"] == f"127.0.0.1:{upstream_port}"
    assert host["health_status"] == "HEALTHY"
    assert clusters["backend"]["observability_name"] == "backend"
    [dead] = clusters["dead"]["circuit_breakers"]["thresholds"]
    assert (dead["max_connections"], dead["max_pending_requests"], dead["max_retries"]) == (7, 1024, 0)

    status, body = http_get(f"{proc.admin}/extensions")
    assert status == 200
    exts = {(e["category"], e["name"]): e for e in json.loads(body)}
    router = exts[("filters.http", "router")]
    assert (router["distribution"], router["version"], router["status"]) == ("outrider", outrider.__version__, "stable")
    assert exts[("filters.network", "tcp_proxy")]["listener_protocol"] == "tcp"

    status, body = http_get(f"{proc.admin}/")
    assert status == 200
    for path in ("/ready", "/stats", "/clusters", "/config_dump", "/server_info", "/listeners", "/extensions", "/quitquitquit"):
        assert path in body

    status, body = http_get(f"{proc.admin}/nosuch")
    assert status == 404
    assert "/stats" in body  # the 404 lists what exists



def test_no_uvloop_runs_asyncios_own_loop(proxy, upstream):
    port = free_port()
    upstream_port, _ = upstream
    proc = proxy.start(admin_config(port, upstream_port, free_port()), extra_args=["--no-uvloop"])
    assert json.loads(http_get(f"{proc.admin}/server_info")[1])["event_loop"] == "asyncio"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for i in range(3):  # keep-alive on asyncio's transports too
            assert request(port, f"/ok/{i}", sock)[0] == 200
    assert proc.wait_stat("http.ingress.downstream_rq_2xx", 3) == 3


@pytest.mark.parametrize("path", ["/healthcheck/fail", "/healthcheck/ok", "/quitquitquit"])
def test_mutating_endpoints_refuse_get(running, path):
    proc, *_ = running
    status, _ = http_get(f"{proc.admin}{path}")
    assert status == 405
    # ... and did nothing.
    assert http_get(f"{proc.admin}/ready") == (200, "LIVE\n")
    assert proc.proc.poll() is None


def test_read_only_endpoints_refuse_post(running):
    proc, *_ = running
    assert http_get(f"{proc.admin}/stats", method="POST")[0] == 405


def test_quitquitquit_exits_zero(running):
    proc, port, *_ = running
    assert request(port, "/")[0] == 200
    assert http_get(f"{proc.admin}/quitquitquit", method="POST") == (200, "OK\n")
    assert proc.proc.wait(5) == 0
    output = proc.output()
    assert "stopped" in output
    assert "Traceback" not in output
    assert not port_in_use(port)
    assert not port_in_use(proc.admin_port)
