"""The stats store: histograms (unit), tag extraction, snapshots, the sink
runner; and through a real proxy: request-time histograms after known
traffic, their /stats text and JSON forms, the Envoy stat names the
observability issue lists, and /stats/prometheus on by default and turned off."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import socket
import time

import httpx
import pytest

from outrider.sinks import RateLimitedLog, SinkRunner
from outrider.stats import (
    BOUNDS,
    DEFAULT_BUCKETS,
    SUPPORTED_QUANTILES,
    Histogram,
    SnapshotTaker,
    StatsGroup,
    StatsStore,
    TagExtractor,
)
from support import free_port, http_get

# -- Histogram -------------------------------------------------------------------


def test_histogram_records_counts_and_sum() -> None:
    h = Histogram("x")
    assert not h.used and h.count == 0
    for v in (0.2, 3.0, 3.0, 47.5):
        h.record(v)
    assert h.used and h.count == 4
    assert h.sum == pytest.approx(53.7)
    stats = h.cumulative()
    assert stats.count == 4 and stats.sum == pytest.approx(53.7)
    # The counts are copied: recording more leaves a taken statistic alone.
    h.record(1.0)
    assert stats.count == 4 and h.count == 5


def test_histogram_quantiles_are_within_a_bucket_of_the_truth() -> None:
    h = Histogram("x")
    values = [float(v) for v in range(1, 1001)]  # 1..1000 ms, uniform
    for v in values:
        h.record(v)
    q = dict(zip(SUPPORTED_QUANTILES, h.cumulative().quantiles()))
    for percent, estimate in q.items():
        truth = max(1.0, percent / 100 * 1000)
        # Two significant digits per bucket: at worst ~10% at a decade's start.
        assert estimate == pytest.approx(truth, rel=0.1), (percent, estimate)
    assert q[0] <= 1.0 <= q[25] and q[100] == 1000.0
    assert list(q.values()) == sorted(q.values())  # monotone

    one = Histogram("one")
    for _ in range(100):
        one.record(2.0)
    for estimate in one.cumulative().quantiles():
        assert 1.9 <= estimate <= 2.0  # every quantile is in 2.0's bucket (1.9, 2.0]


def test_histogram_empty_quantiles_are_nan_and_overflow_is_kept() -> None:
    assert all(math.isnan(v) for v in Histogram("x").cumulative().quantiles())
    h = Histogram("x")
    h.record(5e7)  # above the last bound (1e7 ms)
    assert h.counts[-1] == 1 and h.count == 1
    assert h.cumulative().quantile(50) == BOUNDS[-1]
    assert h.cumulative().cumulative_buckets()[-1] == (DEFAULT_BUCKETS[-1], 0)


def test_exported_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram("x")
    for v in (0.5, 0.51, 5.0, 5.01, 30.0, 9999.0):
        h.record(v)
    buckets = dict(h.cumulative().cumulative_buckets())
    assert set(buckets) == set(DEFAULT_BUCKETS)
    assert buckets[0.5] == 1  # le is inclusive: 0.5 counts, 0.51 does not
    assert buckets[1] == 2
    assert buckets[5] == 3
    assert buckets[10] == 4
    assert buckets[25] == 4 and buckets[50] == 5
    assert buckets[5000] == 5 and buckets[10000] == 6
    # Any two-significant-digit bound is exact too.
    assert dict(h.cumulative().cumulative_buckets((0.51, 31)))[0.51] == 2


def test_histogram_intervals_latch_and_since() -> None:
    h = Histogram("x")
    assert h.interval() is None
    h.record(1.0)
    h.record(2.0)
    h.latch()
    assert h.interval().count == 2  # type: ignore[union-attr]
    h.record(100.0)
    h.latch()
    interval = h.interval()
    assert interval is not None and interval.count == 1 and interval.sum == pytest.approx(100.0)
    assert 99 <= interval.quantile(50) <= 100
    h.latch()
    assert h.interval().count == 0  # type: ignore[union-attr]
    assert h.cumulative().count == 3


def test_nonzero_buckets_give_midpoints_and_counts() -> None:
    h = Histogram("x")
    for v in (1.95, 1.95, 1.95, 40.0):
        h.record(v)
    assert list(h.cumulative().nonzero()) == [(pytest.approx(1.95), 3), (pytest.approx(39.5), 1)]


def test_histogram_record_is_cheap() -> None:
    # The hot path: a bisect into a preallocated list and two additions.
    h = Histogram("x")
    start = time.perf_counter()
    for i in range(100_000):
        h.record(i * 0.01)
    per_call = (time.perf_counter() - start) / 100_000
    assert h.count == 100_000
    assert per_call < 5e-6, f"{per_call * 1e9:.0f} ns per record"


# -- the store, groups, tags, snapshots --------------------------------------------


def test_store_groups_and_kinds() -> None:
    store = StatsStore()

    class Group(StatsGroup):
        COUNTERS = ("rq",)
        GAUGES = ("active",)
        HISTOGRAMS = ("rq_time",)

    group = Group(store.scope("thing.a"))
    group.rq_time.record(3.0)
    assert store.histogram("thing.a.rq_time") is group.rq_time
    assert store.get("thing.a.rq_time") is group.rq_time
    assert [h.name for h in store.histograms()] == ["thing.a.rq_time"]
    # Iterating the store still gives counters and gauges only.
    assert [s.name for s in store] == ["thing.a.active", "thing.a.rq"]
    with pytest.raises(TypeError, match="is a histogram, not a counter"):
        store.counter("thing.a.rq_time")
    with pytest.raises(TypeError, match="is a counter, not a histogram"):
        store.histogram("thing.a.rq")


@pytest.mark.parametrize(
    "name, tag_name, tags",
    [
        ("cluster.api.upstream_rq_2xx", "cluster.upstream_rq_xx", {"cluster": "api", "response_code_class": "2xx"}),
        ("cluster.api.upstream_rq_503", "cluster.upstream_rq_code", {"cluster": "api", "response_code": "503"}),
        ("cluster.api.upstream_rq_total", "cluster.upstream_rq_total", {"cluster": "api"}),
        ("cluster.api.v1.upstream_rq_time", "cluster.upstream_rq_time", {"cluster": "api.v1"}),  # known name
        ("http.web.downstream_rq_4xx", "http.downstream_rq_xx", {"stat_prefix": "web", "response_code_class": "4xx"}),
        ("http.web.protocol_error.bad_chunk", "http.protocol_error.bad_chunk", {"stat_prefix": "web"}),
        ("listener.127.0.0.1:10000.downstream_cx_active", "listener.downstream_cx_active", {"listener": "127.0.0.1:10000"}),
        ("listener.[::1]:80.downstream_cx_total", "listener.downstream_cx_total", {"listener": "[::1]:80"}),
        ("tcp.db.downstream_cx_total", "tcp.downstream_cx_total", {"stat_prefix": "db"}),
        ("server.uptime", "server.uptime", {}),
        ("add_header.add_header.added", "add_header.add_header.added", {}),
    ],
)
def test_tag_extraction(name: str, tag_name: str, tags: dict[str, str]) -> None:
    extractor = TagExtractor.for_config(
        {"clusters": [{"name": "api"}, {"name": "api.v1"}], "listeners": [{"http": {"stat_prefix": "web"}}]}
    )
    assert extractor.extract(name) == (tag_name, tuple(tags.items()))


def test_snapshots_carry_deltas_and_intervals_per_taker() -> None:
    store = StatsStore()
    rq = store.counter("cluster.a.upstream_rq_total")
    active = store.gauge("cluster.a.upstream_cx_active")
    timing = store.histogram("cluster.a.upstream_rq_time")
    first, second = SnapshotTaker(store), SnapshotTaker(store)
    rq.inc(3)
    active.set(2)
    timing.record(10.0)
    snap = first.take()
    assert [(c.name, c.value, c.delta) for c in snap.counters] == [("cluster.a.upstream_rq_total", 3, 3)]
    assert snap.counters[0].tag_name == "cluster.upstream_rq_total" and snap.counters[0].tags == (("cluster", "a"),)
    assert [(g.name, g.value) for g in snap.gauges] == [("cluster.a.upstream_cx_active", 2)]
    assert snap.histograms[0].interval.count == 1
    rq.inc(2)
    timing.record(20.0)
    timing.record(30.0)
    snap = first.take()
    assert (snap.counters[0].value, snap.counters[0].delta) == (5, 2)
    assert (snap.histograms[0].interval.count, snap.histograms[0].cumulative.count) == (2, 3)
    assert snap.histograms[0].interval.sum == pytest.approx(50.0)
    # Another taker has its own previous snapshot.
    snap = second.take()
    assert snap.counters[0].delta == 5 and snap.histograms[0].interval.count == 3


# -- the sink runner ---------------------------------------------------------------------


class FlakySink:
    flush_interval = 0.02

    def __init__(self) -> None:
        self.snapshots: list = []
        self.started_with = None
        self.stopped = False

    def start(self, store: StatsStore) -> None:
        self.started_with = store

    def flush(self, snapshot) -> None:
        self.snapshots.append(snapshot)
        raise RuntimeError("collector exploded")

    def stop(self) -> None:
        self.stopped = True


def test_sink_runner_flushes_on_its_interval_and_contains_failures(caplog) -> None:
    store = StatsStore()
    counter = store.counter("x.rq")
    sink = FlakySink()
    runner = SinkRunner("flaky", sink, store)

    async def run() -> None:
        runner.start()
        counter.inc(4)
        await asyncio.sleep(0.25)
        runner.stop()

    with caplog.at_level(logging.ERROR, logger="outrider.stats_sinks"):
        asyncio.run(run())
    assert sink.started_with is store and sink.stopped
    # Flushed on the timer (and once more on stop), each failure counted...
    assert len(sink.snapshots) >= 5
    assert store.counter("stats_sinks.flaky.flush_error").value == len(sink.snapshots)
    deltas = [c.delta for snap in sink.snapshots for c in snap.counters if c.name == "x.rq"]
    assert sum(deltas) == 4 and deltas[0] == 4
    # ...and logged once (the rest are rate limited).
    assert len([r for r in caplog.records if "collector exploded" in r.getMessage()]) == 1


def test_rate_limited_log_counts_what_it_left_out(caplog) -> None:
    logger = logging.getLogger("outrider.test.ratelimit")
    log = RateLimitedLog(logger, interval=0.2)
    with caplog.at_level(logging.WARNING, logger="outrider.test.ratelimit"):
        for _ in range(5):
            log(logging.WARNING, "down: %s", "x")
        time.sleep(0.25)
        log(logging.WARNING, "down: %s", "y")
    messages = [r.getMessage() for r in caplog.records if r.name == "outrider.test.ratelimit"]
    assert messages[0] == "down: x"
    # The count is of what was left out since the last line, and says how long ago that was.
    said = re.fullmatch(r"down: y \(and 4 more times since this was last logged, ([\d.]+)s ago\)", messages[1])
    assert said is not None and float(said.group(1)) >= 0.25, messages


# -- through a real proxy ---------------------------------------------------------------------


def proxy_config(port: int, upstream_port: int, dead_port: int) -> str:
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
            - match: {{prefix: /dead}}
              route: {{cluster: dead}}
            - match: {{prefix: /}}
              route: {{cluster: backend}}
clusters:
  - name: backend
    endpoints: ["127.0.0.1:{upstream_port}"]
  - name: dead
    endpoints: ["127.0.0.1:{dead_port}"]
"""


def get(port: int, path: str) -> int:
    """One request on a fresh connection (redirects are not followed)."""
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code


def histogram_line(text: str, name: str) -> dict[str, tuple[str, str]]:
    line = next(line for line in text.splitlines() if line.startswith(f"{name}: "))
    return {q: (i, c) for q, i, c in re.findall(r"P([\d.]+)\(([^,]+),([^)]+)\)", line)}


def test_request_time_histograms_after_known_traffic(proxy, upstream) -> None:
    port, dead_port = free_port(), free_port()
    proc = proxy.start(proxy_config(port, upstream[0], dead_port))
    # Four fast requests, four that the upstream holds for 300 ms.
    for _ in range(4):
        assert get(port, "/fast") == 200
    for _ in range(4):
        assert get(port, "/delay/0.3") == 200
    assert get(port, "/dead") == 503
    assert proc.wait_stat("http.web.downstream_rq_completed", 9) == 9

    status, text = http_get(f"{proc.admin}/stats")
    assert status == 200
    upstream_q = histogram_line(text, "cluster.backend.upstream_rq_time")
    assert list(upstream_q) == ["0", "25", "50", "75", "90", "95", "99", "99.5", "99.9", "100"]
    cumulative = {q: float(c) for q, (i, c) in upstream_q.items()}
    assert all(i == "nan" for i, _ in upstream_q.values())  # no interval closed yet (5 s)
    assert cumulative["0"] < 100 and cumulative["25"] < 100  # the fast half
    assert 290 <= cumulative["75"] <= 400 and 290 <= cumulative["100"] <= 400  # the slow half
    assert list(cumulative.values()) == sorted(cumulative.values())
    # The downstream time covers the 503 as well, and is never shorter.
    downstream_q = histogram_line(text, "http.web.downstream_rq_time")
    assert 290 <= float(downstream_q["100"][1]) <= 400
    # Histograms come after the counters and gauges, as in Envoy; an unused
    # one says so, and ?usedonly leaves it out.
    lines = text.splitlines()
    first_histogram = min(i for i, line in enumerate(lines) if " P0(" in line or "No recorded values" in line)
    assert all(re.fullmatch(r"\S+: -?\d+", line) for line in lines[:first_histogram])
    assert "cluster.dead.upstream_rq_time: No recorded values" in lines
    used = http_get(f"{proc.admin}/stats?usedonly&filter=_rq_time$")[1]
    assert [line.split(":")[0] for line in used.splitlines()] == [
        "cluster.backend.upstream_rq_time", "http.web.downstream_rq_time",
    ]

    status, body = http_get(f"{proc.admin}/stats?format=json&filter=upstream_rq_time$")
    assert status == 200
    stats = json.loads(body)["stats"]
    assert len(stats) == 1  # no counters match; the histograms element
    histograms = stats[0]["histograms"]
    assert histograms["supported_quantiles"] == [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]
    by_name = {h["name"]: h["values"] for h in histograms["computed_quantiles"]}
    assert set(by_name) == {"cluster.backend.upstream_rq_time", "cluster.dead.upstream_rq_time"}
    assert by_name["cluster.dead.upstream_rq_time"][5] == {"interval": None, "cumulative": None}
    p100 = by_name["cluster.backend.upstream_rq_time"][-1]
    assert p100["interval"] is None and p100["cumulative"] == pytest.approx(cumulative["100"], rel=1e-3)


def test_the_envoy_stat_names_exist(proxy, upstream) -> None:
    port = free_port()
    proc = proxy.start(proxy_config(port, upstream[0], free_port()))
    assert get(port, "/") == 200
    assert get(port, "/status/503") == 503
    proc.wait_stat("cluster.backend.upstream_rq_503", 1)
    stats = proc.stats()
    names = set(stats) | {
        h["name"]
        for h in json.loads(http_get(f"{proc.admin}/stats?format=json")[1])["stats"][-1]["histograms"]["computed_quantiles"]
    }
    listener = f"listener.127.0.0.1:{port}"
    expected = [
        *(f"http.web.downstream_rq_{s}" for s in ("total", "2xx", "3xx", "4xx", "5xx", "time")),
        *(f"http.web.downstream_cx_{s}" for s in ("total", "active", "destroy")),
        *(f"cluster.backend.upstream_rq_{s}" for s in ("total", "2xx", "5xx", "200", "503", "time", "timeout", "retry")),
        *(f"cluster.backend.upstream_cx_{s}" for s in ("total", "active", "connect_fail", "connect_timeout")),
        "cluster.backend.membership_healthy", "cluster.backend.membership_total",
        f"{listener}.downstream_cx_total", f"{listener}.downstream_cx_active",
        "server.uptime", "server.live", "server.memory_allocated",
    ]
    assert [n for n in expected if n not in names] == []
    assert stats["cluster.backend.upstream_rq_503"] == 1
    assert stats["server.live"] == 1
    # Resident memory of a Python process: more than 5 MB, less than 2 GB.
    assert 5 << 20 < stats["server.memory_allocated"] < 2 << 30


def stuck_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: Linux drops further SYNs, so a
    connect to it neither succeeds nor fails (how a host that does not answer
    looks, on loopback). Returns it and the connections that fill it."""
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        filler.connect_ex(stuck.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    return stuck, fillers


def test_stat_values_after_known_events(proxy, upstream) -> None:
    """Not only that the stats exist: the values they should have."""
    stuck, fillers = stuck_listener()
    try:
        port = free_port()
        unused = [free_port(), free_port()]
        started = time.monotonic()
        proc = proxy.start(f"""
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http:
      stat_prefix: web
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - {{match: {{prefix: /stuck}}, route: {{cluster: stuck}}}}
            - {{match: {{prefix: /}}, route: {{cluster: backend}}}}
clusters:
  - {{name: backend, endpoints: ["127.0.0.1:{upstream[0]}"]}}
  - {{name: trio, endpoints: ["127.0.0.1:{upstream[0]}", "127.0.0.1:{unused[0]}", "127.0.0.1:{unused[1]}"]}}
  - {{name: stuck, endpoints: ["127.0.0.1:{stuck.getsockname()[1]}"], connect_timeout: 300ms}}
""")
        stats = proc.stats()
        assert (stats["cluster.trio.membership_total"], stats["cluster.trio.membership_healthy"]) == (3, 3)
        assert (stats["cluster.backend.membership_total"], stats["cluster.backend.membership_healthy"]) == (1, 1)

        # One client connection, two requests on it; destroyed once it closes.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            for _ in range(2):
                client.sendall(b"GET /keep HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while b'"upstream"' not in reply:  # the echo's JSON body
                    chunk = client.recv(65536)
                    assert chunk, reply
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 200 ")
            stats = proc.stats()
            assert (stats["http.web.downstream_cx_total"], stats["http.web.downstream_cx_active"],
                    stats["http.web.downstream_cx_destroy"]) == (1, 1, 0)
        assert proc.wait_stat("http.web.downstream_cx_destroy", 1) == 1
        assert proc.stat("http.web.downstream_cx_active") == 0

        # A host that never completes the handshake: the connect times out, 503.
        before = time.monotonic()
        assert get(port, "/stuck") == 503
        assert 0.25 <= time.monotonic() - before < 3
        stats = proc.stats()
        assert (stats["cluster.stuck.upstream_cx_connect_timeout"], stats["cluster.stuck.upstream_cx_connect_fail"]) == (1, 1)
        assert stats["cluster.backend.upstream_cx_connect_timeout"] == 0

        # server.uptime: whole seconds since the start, updated every second.
        assert proc.wait_stat("server.uptime", 1, timeout=3) >= 1
        assert proc.stat("server.uptime") <= time.monotonic() - started + 1
    finally:
        for filler in fillers:
            filler.close()
        stuck.close()


def test_stats_prometheus_is_on_by_default(proxy, upstream) -> None:
    proc = proxy.start(proxy_config(free_port(), upstream[0], free_port()))
    status, body = http_get(f"{proc.admin}/stats/prometheus")
    assert status == 200
    assert "# TYPE outrider_server_live gauge" in body
    assert "/stats/prometheus" in http_get(f"{proc.admin}/")[1]


def test_stats_prometheus_turned_off_says_how_to_get_it(proxy, upstream) -> None:
    proc = proxy.start("stats: {sinks: []}\n" + proxy_config(free_port(), upstream[0], free_port()))
    status, body = http_get(f"{proc.admin}/stats/prometheus")
    assert status == 404
    assert "stats: {sinks: [prometheus, ...]}" in body
    assert "/stats/prometheus" not in http_get(f"{proc.admin}/")[1]
