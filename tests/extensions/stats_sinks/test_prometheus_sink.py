"""The prometheus stats sink: /stats/prometheus of a real proxy after real
traffic, read with prometheus-client's own parser."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import httpx
from prometheus_client.parser import text_string_to_metric_families

from support import free_port, http_get


def config(port: int, upstream_port: int, dead_port: int, sink: str = "prometheus") -> str:
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
          routes:
            - match: {{path: /moved}}
              redirect: {{path_redirect: /elsewhere, response_code: 302}}
            - match: {{prefix: /dead}}
              route: {{cluster: dead.pool}}
            - match: {{prefix: /}}
              route: {{cluster: backend}}
clusters:
  - name: backend
    endpoints: ["127.0.0.1:{upstream_port}"]
  - name: dead.pool
    endpoints: ["127.0.0.1:{dead_port}"]
"""


def get(port: int, path: str) -> int:
    """One request on a fresh connection (redirects are not followed)."""
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code


def scrape(admin: str, query: str = "") -> tuple[str, dict]:
    with urllib.request.urlopen(f"{admin}/stats/prometheus{query}", timeout=5) as resp:
        content_type = resp.headers["content-type"]
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return content_type, families


def value(families: dict, family: str, sample: str, **labels: str) -> float:
    matches = [s.value for s in families[family].samples if s.name == sample and s.labels == labels]
    assert len(matches) == 1, (sample, labels, families[family].samples)
    return matches[0]


def test_prometheus_output_after_real_traffic(proxy, upstream) -> None:
    port, dead_port = free_port(), free_port()
    proc = proxy.start(config(port, upstream[0], dead_port))
    codes = [get(port, p) for p in ("/a", "/b", "/c", "/status/404", "/status/503", "/moved", "/dead/x")]
    assert codes == [200, 200, 200, 404, 503, 302, 503]
    proc.wait_stat("http.web.downstream_rq_completed", 7)

    content_type, families = scrape(proc.admin)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"

    # Counters: the class and the code become labels; names end in _total.
    fam = "outrider_cluster_upstream_rq_xx"
    assert families[fam].type == "counter"
    assert value(families, fam, f"{fam}_total", cluster="backend", response_code_class="2xx") == 3
    assert value(families, fam, f"{fam}_total", cluster="backend", response_code_class="4xx") == 1
    assert value(families, fam, f"{fam}_total", cluster="backend", response_code_class="5xx") == 1
    fam = "outrider_cluster_upstream_rq_code"
    assert value(families, fam, f"{fam}_total", cluster="backend", response_code="200") == 3
    assert value(families, fam, f"{fam}_total", cluster="backend", response_code="503") == 1
    fam = "outrider_cluster_upstream_rq"
    assert value(families, fam, f"{fam}_total", cluster="backend") == 5
    # A cluster name with a dot is one label value, found from the config.
    fam = "outrider_cluster_upstream_cx_connect_fail"
    assert value(families, fam, f"{fam}_total", cluster="dead.pool") == 1
    fam = "outrider_http_downstream_rq_xx"
    assert value(families, fam, f"{fam}_total", stat_prefix="web", response_code_class="2xx") == 3
    assert value(families, fam, f"{fam}_total", stat_prefix="web", response_code_class="3xx") == 1
    assert value(families, fam, f"{fam}_total", stat_prefix="web", response_code_class="5xx") == 2
    fam = "outrider_listener_downstream_cx"
    assert value(families, fam, f"{fam}_total", listener=f"127.0.0.1:{port}") == 7

    # Gauges.
    fam = "outrider_cluster_membership_healthy"
    assert families[fam].type == "gauge"
    assert value(families, fam, fam, cluster="backend") == 1
    assert value(families, "outrider_server_live", "outrider_server_live") == 1
    assert value(families, "outrider_server_memory_allocated", "outrider_server_memory_allocated") > 1 << 20

    # Histograms: cumulative buckets in ms, +Inf = _count.
    fam = "outrider_http_downstream_rq_time"
    assert families[fam].type == "histogram"
    buckets = {
        s.labels["le"]: s.value
        for s in families[fam].samples
        if s.name == f"{fam}_bucket" and s.labels["stat_prefix"] == "web"
    }
    assert list(buckets) == [
        "0.5", "1.0", "5.0", "10.0", "25.0", "50.0", "100.0", "250.0", "500.0", "1000.0", "2500.0", "5000.0",
        "10000.0", "30000.0", "60000.0", "300000.0", "600000.0", "1.8e+06", "3.6e+06", "+Inf",
    ]
    assert list(buckets.values()) == sorted(buckets.values())
    assert buckets["+Inf"] == 7 == value(families, fam, f"{fam}_count", stat_prefix="web")
    assert buckets["1000.0"] == 7  # every request took less than a second
    assert 0 < value(families, fam, f"{fam}_sum", stat_prefix="web") < 7000
    fam = "outrider_cluster_upstream_rq_time"
    assert value(families, fam, f"{fam}_count", cluster="backend") == 5
    assert value(families, fam, f"{fam}_count", cluster="dead.pool") == 0

    # The sink's own stat.
    fam = "outrider_stats_sinks_prometheus_scrapes"
    assert value(families, fam, f"{fam}_total") == 1


def test_filter_usedonly_and_errors(proxy, upstream) -> None:
    port = free_port()
    proc = proxy.start(config(port, upstream[0], free_port()))
    assert get(port, "/") == 200
    proc.wait_stat("cluster.backend.upstream_rq_2xx", 1)

    _, families = scrape(proc.admin, "?filter=^cluster%5C.backend%5C.upstream_rq_")
    samples = [s for f in families.values() for s in f.samples]
    assert samples and all(s.labels.get("cluster") == "backend" for s in samples)
    assert "outrider_http_downstream_rq_xx" not in families

    _, families = scrape(proc.admin, "?usedonly")
    assert "outrider_cluster_upstream_rq_timeout" not in families  # still 0
    assert [s.labels["response_code_class"] for s in families["outrider_cluster_upstream_rq_xx"].samples] == ["2xx"]
    assert "outrider_cluster_upstream_rq_time" in families
    assert [s.labels["cluster"] for s in families["outrider_cluster_upstream_rq_time"].samples
            if s.name.endswith("_count")] == ["backend"]

    status, body = http_get(f"{proc.admin}/stats/prometheus?filter=(unclosed")
    assert status == 400 and "invalid regex" in body
    # The admin's index lists the endpoint the sink added.
    assert "/stats/prometheus" in http_get(f"{proc.admin}/")[1]


def test_namespace_path_and_buckets_are_configurable(proxy, upstream) -> None:
    port = free_port()
    sink = "{name: prometheus, config: {namespace: edge, path: /metrics, buckets: [1, 2.5, 1000]}}"
    proc = proxy.start(config(port, upstream[0], free_port(), sink=sink))
    assert get(port, "/") == 200
    proc.wait_stat("http.web.downstream_rq_completed", 1)
    assert http_get(f"{proc.admin}/stats/prometheus")[0] == 404
    with urllib.request.urlopen(f"{proc.admin}/metrics", timeout=5) as resp:
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    assert all(name.startswith("edge_") for name in families)
    les = [s.labels["le"] for s in families["edge_http_downstream_rq_time"].samples if s.name.endswith("_bucket")]
    assert les == ["1.0", "2.5", "1000.0", "+Inf"]


def test_bad_config_is_refused_by_validate(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("stats:\n  sinks:\n    - {name: prometheus, config: {namespace: 9lives, bukets: [1]}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "outrider", "validate", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "stats.sinks[0].config.namespace" in result.stderr
    assert "unknown field 'bukets' (did you mean 'buckets'?)" in result.stderr


def test_names_that_would_collide_stay_distinct() -> None:
    from outrider.context import BuildContext
    from outrider.extensions.stats_sinks.prometheus import PrometheusSink
    from outrider.registry import Registry
    from outrider.stats import SnapshotTaker, StatsStore

    store = StatsStore()
    store.counter("app.requests").inc(2)  # counter outrider_app_requests(_total)
    store.gauge("app.requests_total").set(7)  # would be written as outrider_app_requests_total too
    store.histogram("app.requests_time").record(3.0)
    store.counter("app.requests_time_count").inc()  # would be the histogram's _count sample
    sink = PrometheusSink({}, BuildContext(Registry(), store))
    text = sink.render(SnapshotTaker(store).take()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["outrider_app_requests"].samples[0].value == 2
    assert families["outrider_app_requests_total_gauge"].samples[0].value == 7
    # Counters are named first, then gauges, then histograms: the later one
    # of a clashing pair gets its kind appended.
    assert families["outrider_app_requests_time_count"].samples[0].value == 1
    histogram = families["outrider_app_requests_time_histogram"]
    assert histogram.type == "histogram"
    assert [s.value for s in histogram.samples if s.name.endswith("_count")] == [1]
    samples = [(s.name, tuple(sorted(s.labels.items()))) for f in families.values() for s in f.samples]
    assert len(samples) == len(set(samples))
