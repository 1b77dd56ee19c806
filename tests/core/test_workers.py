"""``workers: N``: a supervisor and N worker processes sharing each
listening port (SO_REUSEPORT), stats summed at the admin interface."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import free_port, http_get, wait_for


def config(port: int, upstream_port: int, workers: int | str = 2, extra_top: str = "") -> str:
    return f"""
{extra_top}workers: {workers}
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http:
      stat_prefix: web
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: backend}}
clusters:
  - name: backend
    endpoints: ["127.0.0.1:{upstream_port}"]
"""


def get(port: int, path: str) -> int:
    """One request on a new connection (so the kernel picks a worker each time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def server_info(proc) -> dict:
    return json.loads(http_get(f"{proc.admin}/server_info")[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"



def test_two_workers_share_the_port_and_the_admin_sums_their_stats(proxy, upstream):
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(port, upstream_port, extra_top="stats: {sinks: [prometheus]}\n"))
    info = server_info(proc)
    assert info["command_line_options"]["concurrency"] == 2
    pids = info["worker_pids"]
    assert len(set(pids)) == 2 and proc.proc.pid not in pids and all(alive(p) for p in pids)
    assert proc.stat("server.concurrency") == 2

    assert [get(port, f"/r{i}") for i in range(60)] == [200] * 60
    stats = proc.stats()
    assert stats["http.web.downstream_rq_total"] == 60
    assert stats["http.web.downstream_rq_2xx"] == 60
    assert stats["cluster.backend.upstream_rq_2xx"] == 60
    # The kernel spread the 60 connections over both workers.
    per_worker = [stats.get(f"listener.127.0.0.1:{port}.worker_{i}.downstream_cx_total", 0) for i in range(2)]
    assert sum(per_worker) == stats[f"listener.127.0.0.1:{port}.downstream_cx_total"] == 60
    assert min(per_worker) > 0, per_worker
    # Gauges every worker derives from the config are not multiplied.
    assert stats["cluster.backend.membership_total"] == 1
    # Histograms are summed bucket by bucket.
    body = json.loads(http_get(f"{proc.admin}/stats?format=json&filter=downstream_rq_time")[1])
    [histograms] = [s["histograms"] for s in body["stats"] if "histograms" in s]
    assert [h["name"] for h in histograms["computed_quantiles"]] == ["http.web.downstream_rq_time"]
    # The prometheus sink, in the supervisor, shows the summed histogram.
    families = {f.name: f for f in text_string_to_metric_families(http_get(f"{proc.admin}/stats/prometheus")[1])}
    fam = "outrider_http_downstream_rq_time"
    [count] = [s.value for s in families[fam].samples if s.name == f"{fam}_count" and s.labels["stat_prefix"] == "web"]
    assert count == 60


def test_a_worker_that_dies_is_replaced_and_totals_do_not_go_down(proxy, upstream):
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(port, upstream_port))
    assert [get(port, "/before") for _ in range(20)] == [200] * 20
    assert proc.stat("http.web.downstream_rq_total") == 20
    before = proc.stats()
    victim = server_info(proc)["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: victim not in server_info(proc)["worker_pids"] and len(server_info(proc)["worker_pids"]) == 2, timeout=10)
    assert proc.stat("server.worker_restarts") == 1
    assert re.search(rf"worker 0 \(pid {victim}\) exited with status -9; starting another", proc.output())
    # Requests keep working (on both workers), and what the dead one counted is kept.
    assert [get(port, "/after") for _ in range(20)] == [200] * 20
    after = proc.stats()
    assert after["http.web.downstream_rq_total"] == 40
    for i in range(2):  # per-worker counters do not go down with a new process either
        name = f"listener.127.0.0.1:{port}.worker_{i}.downstream_cx_total"
        assert after.get(name, 0) >= before.get(name, 0)


def test_sigterm_drains_every_worker_and_exits_zero(proxy, upstream):
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(port, upstream_port))
    pids = server_info(proc)["worker_pids"]
    assert get(port, "/") == 200
    assert proc.stop(signal.SIGTERM) == 0
    assert wait_for(lambda: not any(alive(p) for p in pids), timeout=5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_worker_that_cannot_start_fails_the_start(proxy, upstream):
    upstream_port, _ = upstream
    port = free_port()
    with socket.socket() as taken:  # the port is held without SO_REUSEPORT: no worker can bind it
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = proxy.start(config(port, upstream_port), wait=False)
        assert proc.proc.wait(timeout=30) == 1
    assert "cannot bind" in proc.output()


def test_workers_auto_and_port_0(proxy, upstream):
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(port, upstream_port, workers='"auto"'))
    cpus = len(os.sched_getaffinity(0))
    assert server_info(proc)["command_line_options"]["concurrency"] == cpus
    assert get(port, "/") == 200
    refused = proxy.start(config(0, upstream_port, workers=2), wait=False)
    assert refused.proc.wait(timeout=30) == 1
    assert "port 0 cannot be shared by 2 workers" in refused.output()


def test_workers_share_one_access_log_and_reopen_it_on_sigusr1(proxy, upstream, tmp_path):
    upstream_port, _ = upstream
    port = free_port()
    path = tmp_path / "access.log"
    access_log = f"""    access_log:
      - name: file
        config: {{path: "{path}", flush_interval: 10ms, format: "%REQ(:PATH)% %RESPONSE_CODE%\\n"}}
"""
    proc = proxy.start(config(port, upstream_port).replace("clusters:", access_log + "clusters:", 1))
    assert [get(port, f"/a{i}") for i in range(30)] == [200] * 30
    assert wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == 30, timeout=10)
    assert sorted(path.read_text().splitlines()) == sorted(f"/a{i} 200" for i in range(30))  # whole lines only
    path.rename(tmp_path / "access.log.1")  # what logrotate does, then it signals
    proc.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    assert [get(port, f"/b{i}") for i in range(10)] == [200] * 10
    assert wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == 10, timeout=10)
    assert sorted(path.read_text().splitlines()) == sorted(f"/b{i} 200" for i in range(10))


def test_workers_drain_and_exit_when_the_supervisor_dies(proxy, upstream):
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(port, upstream_port))
    pids = server_info(proc)["worker_pids"]
    proc.proc.kill()  # no chance to stop them: the kernel's parent-death signal or the closed channel does
    proc.proc.wait(5)
    assert wait_for(lambda: not any(alive(p) for p in pids), timeout=10)


def test_a_big_stats_report_and_the_final_report_at_shutdown(proxy, upstream):
    # 80 clusters make each worker's report larger than asyncio's 64 KiB
    # line limit; and what the workers served after the last collection
    # reaches the sink's last flush through their final reports.
    upstream_port, _ = upstream
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(10)
    port = free_port()
    extra = "".join(f"  - {{name: c{i}, endpoints: ['127.0.0.1:{upstream_port}']}}\n" for i in range(80))
    statsd = f"'127.0.0.1:{receiver.getsockname()[1]}'"
    sinks = f"stats: {{sinks: [{{name: statsd, config: {{address: {statsd}, flush_interval: 1h, prefix: ''}}}}]}}\n"
    try:
        proc = proxy.start(config(port, upstream_port, extra_top=sinks) + extra)
        assert proc.stat("cluster.c79.membership_total") == 1
        assert [get(port, f"/r{i}") for i in range(10)] == [200] * 10
        assert proc.stat("http.web.downstream_rq_total") == 10
        assert [get(port, f"/s{i}") for i in range(5)] == [200] * 5  # maybe not collected before the stop
        assert proc.stop(signal.SIGTERM) == 0
        lines: list[str] = []
        while not any(line.startswith("http.web.downstream_rq_total:") for line in lines):
            lines += receiver.recv(65536).decode().split("\n")
    finally:
        receiver.close()
    # The sink's only flush is its last one: every request is in it.
    assert "http.web.downstream_rq_total:15|c" in lines


def test_a_worker_that_stops_answering_is_killed_and_replaced(proxy, upstream):
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(port, upstream_port))
    hung = server_info(proc)["worker_pids"][0]
    os.kill(hung, signal.SIGSTOP)  # alive, holding its share of the port, answering nothing
    try:
        # The supervisor asks every second and waits 2 s for each answer:
        # after 3 missed answers it kills the worker and starts another.
        assert wait_for(lambda: hung not in server_info(proc)["worker_pids"] and len(server_info(proc)["worker_pids"]) == 2, timeout=20)
    finally:
        if alive(hung):
            os.kill(hung, signal.SIGCONT)
    assert "stopped answering; killing it" in proc.output()
    assert proc.stat("server.worker_restarts") == 1
    assert [get(port, "/") for _ in range(10)] == [200] * 10
