"""The statsd stats sink, with a real UDP receiver: counter deltas across
flushes, gauges, timers, prefix and DogStatsD tags, datagram sizes, the
final flush on shutdown, and a collector that is not there."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from typing import Callable

import httpx
import pytest

from support import free_port


class Receiver:
    """A UDP socket on loopback standing in for the collector."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.packets: list[bytes] = []

    def until(self, predicate: Callable[[list[bytes]], bool], timeout: float = 5.0) -> list[bytes]:
        """Receive datagrams until ``predicate(new ones)`` holds, then the rest
        of that flush; return the new ones."""
        new: list[bytes] = []
        deadline = time.monotonic() + timeout
        while not predicate(new):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not received in {timeout}s: {new!r}"
            self.sock.settimeout(remaining)
            try:
                packet = self.sock.recv(65536)
            except socket.timeout:
                continue
            new.append(packet)
            self.packets.append(packet)
        # The rest of that flush: its datagrams come back to back.
        self.sock.settimeout(0.05)
        while True:
            try:
                packet = self.sock.recv(65536)
            except socket.timeout:
                return new
            new.append(packet)
            self.packets.append(packet)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def config(port: int, upstream_port: int, sink: str) -> str:
    return f"""
stats:
  sinks:
    - {sink}
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http:
      stat_prefix: web
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes: [{{match: {{prefix: /}}, route: {{cluster: backend}}}}]
clusters:
  - name: backend
    endpoints: ["127.0.0.1:{upstream_port}"]
"""


def get(port: int, path: str = "/") -> int:
    """One request on a fresh connection (redirects are not followed)."""
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code


def lines(packets: list[bytes]) -> list[str]:
    return [line for p in packets for line in p.decode().split("\n")]


def has(line_re: str) -> Callable[[list[bytes]], bool]:
    pattern = re.compile(line_re)
    return lambda packets: any(pattern.fullmatch(line) for line in lines(packets))


def deltas(all_lines: list[str], name: str) -> list[int]:
    """The values of the counter lines of ``name``."""
    return [int(m.group(1)) for line in all_lines if (m := re.fullmatch(rf"{re.escape(name)}:(\d+)\|c(\|#.*)?", line))]


def counted(name: str, total: int) -> Callable[[list[bytes]], bool]:
    """Until the deltas of counter ``name`` add up to ``total``."""
    return lambda packets: sum(deltas(lines(packets), name)) >= total


def timer_counts(all_lines: list[str], name: str) -> list[tuple[float, float]]:
    """(value, how many values it stands for) of each timer line of ``name``."""
    out = []
    for line in all_lines:
        m = re.fullmatch(rf"{re.escape(name)}:([\d.]+)\|ms(?:\|@([\d.e-]+))?(?:\|#.*)?", line)
        if m:
            out.append((float(m.group(1)), 1 / float(m.group(2)) if m.group(2) else 1.0))
    return out


def test_counters_gauges_timers_prefix_and_tags(proxy, upstream, receiver) -> None:
    port = free_port()
    sink = (f"{{name: statsd, config: {{address: '127.0.0.1:{receiver.port}', flush_interval: 300ms, "
            f"prefix: edge, tags: {{env: test, canary: ''}}, max_packet_size: 512}}}}")
    proc = proxy.start(config(port, upstream[0], sink))
    tags = r"\|#env:test,canary"

    for _ in range(3):
        assert get(port) == 200
    proc.wait_stat("http.web.downstream_rq_completed", 3)
    # The flushes until all three requests were counted (they may straddle
    # two flushes, so the deltas are added up).
    first = receiver.until(counted("edge.http.web.downstream_rq_total", 3))
    seen = lines(first)
    assert sum(deltas(seen, "edge.http.web.downstream_rq_total")) == 3
    # Gauges are values, with the prefix and the tags.
    assert "edge.server.live:1|g|#env:test,canary" in seen
    assert "edge.cluster.backend.membership_healthy:1|g|#env:test,canary" in seen
    # A ':' in a name (the listener's address) is not sent as the separator.
    assert any(line.startswith(f"edge.listener.127.0.0.1_{port}.downstream_cx_total:") for line in seen)
    # Timers: the request times, one line per bucket, counts by sample rate.
    timers = timer_counts(seen, "edge.cluster.backend.upstream_rq_time")
    assert sum(n for _, n in timers) == pytest.approx(3, rel=1e-3)
    assert all(0 < v < 1000 for v, _ in timers)
    # Every datagram fits max_packet_size and holds whole lines.
    assert all(len(p) <= 512 for p in first)
    assert all(re.fullmatch(r"[^:|\s]+:-?[\d.]+\|(c|g|ms)(\|@[\d.e-]+)?" + tags, line) for line in seen), seen

    # Two more requests: the counter lines are deltas (2, or 1 and 1 when
    # the requests straddle two flushes), never the total of 5.
    for _ in range(2):
        assert get(port) == 200
    second = lines(receiver.until(counted("edge.http.web.downstream_rq_total", 2)))
    assert sum(deltas(second, "edge.http.web.downstream_rq_total")) == 2
    assert 5 not in deltas(second, "edge.http.web.downstream_rq_total")
    assert sum(n for _, n in timer_counts(second, "edge.cluster.backend.upstream_rq_time")) == pytest.approx(2, rel=1e-3)

    # A quiet interval sends no counter lines for requests, but still the gauges.
    quiet = lines(receiver.until(has(r"edge\.server\.live:1\|g.*")))
    assert not [line for line in quiet if line.startswith("edge.http.web.downstream_rq_total:")]
    assert proc.stat("stats_sinks.statsd.flushed") >= 3
    assert proc.stat("stats_sinks.statsd.packets_sent") >= proc.stat("stats_sinks.statsd.flushed")
    assert proc.stat("stats_sinks.statsd.send_failed") == 0


def test_tag_extraction_sends_dogstatsd_tags(proxy, upstream, receiver) -> None:
    port = free_port()
    sink = (f"{{name: statsd, config: {{address: '127.0.0.1:{receiver.port}', flush_interval: 200ms, "
            f"prefix: '', tag_extraction: true, tags: {{region: eu}}}}}}")
    proc = proxy.start(config(port, upstream[0], sink))
    assert get(port, "/status/503") == 503
    proc.wait_stat("http.web.downstream_rq_completed", 1)
    got = lines(receiver.until(has(r"cluster\.upstream_rq_code:1\|c\|#cluster:backend,response_code:503,region:eu")))
    assert "cluster.upstream_rq_xx:1|c|#cluster:backend,response_code_class:5xx,region:eu" in got
    assert "http.downstream_rq_xx:1|c|#stat_prefix:web,response_code_class:5xx,region:eu" in got
    assert f"listener.downstream_cx_total:1|c|#listener:127.0.0.1:{port},region:eu" in got
    assert any(re.fullmatch(r"http\.downstream_rq_time:[\d.]+\|ms\|#stat_prefix:web,region:eu", line) for line in got)


def test_last_interval_is_flushed_on_shutdown(proxy, upstream, receiver) -> None:
    port = free_port()
    sink = f"{{name: statsd, config: {{address: '127.0.0.1:{receiver.port}', flush_interval: 1h}}}}"
    proc = proxy.start(config(port, upstream[0], sink))
    assert get(port) == 200
    proc.wait_stat("http.web.downstream_rq_completed", 1)
    proc.stop()
    got = lines(receiver.until(has(r"outrider\.http\.web\.downstream_rq_total:1\|c")))
    assert "outrider.cluster.backend.upstream_rq_2xx:1|c" in got


def test_absent_collector_costs_a_stat_and_a_log_line_not_a_request(proxy, upstream) -> None:
    closed = free_port()  # nothing listens: each datagram draws ICMP port unreachable
    port = free_port()
    sink = f"{{name: statsd, config: {{address: '127.0.0.1:{closed}', flush_interval: 100ms}}}}"
    proc = proxy.start(config(port, upstream[0], sink))
    deadline = time.monotonic() + 1.5
    served = 0
    while time.monotonic() < deadline:
        assert get(port) == 200
        served += 1
    assert proc.wait_stat("stats_sinks.statsd.send_failed", 3) >= 3
    assert proc.stat("http.web.downstream_rq_2xx") == served
    assert proc.stat("http.web.downstream_rq_5xx") == 0
    assert proc.stat("stats_sinks.statsd.flush_error") == 0  # the sink itself never raised
    # One warning, not one per failed flush (rate limited to one per 30 s).
    warnings = [line for line in proc.output().splitlines() if "statsd: sending stats to" in line]
    assert len(warnings) == 1, warnings
    assert f"127.0.0.1:{closed}" in warnings[0]


def test_bad_config_is_refused_by_validate(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "stats:\n  sinks:\n"
        "    - {name: statsd, config: {address: 127.0.0.1, flush_interval: 5 s, prefix: 'a:b'}}\n"
        "    - statsd\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "outrider", "validate", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    for where in ("stats.sinks[0].config.address", "stats.sinks[0].config.flush_interval",
                  "stats.sinks[0].config.prefix", "stats.sinks[1].config"):
        assert where in result.stderr, result.stderr
    assert "missing required field 'address'" in result.stderr


def test_a_flush_is_batched_into_datagrams_of_many_lines(proxy, upstream, receiver) -> None:
    """Lines are not sent one per datagram: with room enough, a whole flush
    (counters, gauges and timers) is one datagram."""
    port = free_port()
    sink = f"{{name: statsd, config: {{address: '127.0.0.1:{receiver.port}', flush_interval: 200ms, max_packet_size: 65000}}}}"
    proc = proxy.start(config(port, upstream[0], sink))
    for _ in range(3):
        assert get(port) == 200
    proc.wait_stat("http.web.downstream_rq_completed", 3)
    packets = receiver.until(counted("outrider.http.web.downstream_rq_total", 3))
    # Each flush is one datagram, so each datagram holds every gauge (and
    # server.live among them) with whatever counters and timers moved.
    assert all(b"outrider.server.live:1|g" in p.split(b"\n") for p in packets), packets
    carriers = [p.decode().split("\n") for p in packets if b"outrider.http.web.downstream_rq_total:" in p]
    assert carriers and all(len(lines) >= 10 for lines in carriers), carriers
    assert any(line.startswith("outrider.cluster.backend.upstream_rq_time:") and "|ms" in line
               for lines in carriers for line in lines)
    stats = proc.stats()
    assert stats["stats_sinks.statsd.packets_sent"] == stats["stats_sinks.statsd.flushed"] >= len(packets)
