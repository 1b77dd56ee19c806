"""The opentelemetry tracer through the real proxy: a real OTLP/HTTP
receiver checks the exported spans (resource, scope, ids, kinds, times,
attributes, status), a real echo upstream shows the ``traceparent`` and
``tracestate`` it was given. (The export machinery shared with zipkin, and
its behaviour with collectors that hang or are not there, is tested in
test_zipkin.py.)"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from outrider.extensions.tracers.opentelemetry import extract_w3c, parse_traceparent, w3c_headers
from outrider.tracing import SpanContext
from support import free_port
from tracing_support import HEX16, HEX32, config, retrying_config, seen_by_upstream, validate

TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def otlp_spans(body: dict) -> list[dict]:
    return [span for rs in body["resourceSpans"] for ss in rs["scopeSpans"] for span in ss["spans"]]


def tracer(collector_url: str) -> str:
    return f'{{collector: "{collector_url}", service_name: edge, flush_interval: 50ms}}'


def attributes(span: dict) -> dict:
    """OTLP attributes as a plain mapping (intValue as int)."""
    out = {}
    for attribute in span["attributes"]:
        (kind, value), = attribute["value"].items()
        out[attribute["key"]] = int(value) if kind == "intValue" else value
    return out


def by_url(spans: list[dict], suffix: str) -> list[dict]:
    return [s for s in spans if s["kind"] == 2 and attributes(s).get("http.url", "").endswith(suffix)]


def children(spans: list[dict], parent: dict) -> list[dict]:
    return sorted((s for s in spans if s["parentSpanId"] == parent["spanId"]), key=lambda s: int(s["startTimeUnixNano"]))


# -- W3C Trace Context (pure functions) -----------------------------------------------


def test_a_valid_traceparent():
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-01") == SpanContext(TRACE, PARENT, None, True)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == SpanContext(TRACE, PARENT, None, False)
    # A later version may carry more fields; the known ones are used.
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-03-what-comes-next") == SpanContext(TRACE, PARENT, None, True)
    headers = [("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "congo=t61rcWkgMzE"), ("tracestate", "rojo=1")]
    assert extract_w3c(headers).tracestate == "congo=t61rcWkgMzE,rojo=1"
    assert w3c_headers(SpanContext(TRACE, PARENT, None, False, tracestate="a=1")) == [
        ("traceparent", f"00-{TRACE}-{PARENT}-00"), ("tracestate", "a=1")]


@pytest.mark.parametrize("value", [
    "", "garbage", f"00-{TRACE}-{PARENT}", f"00-{TRACE.upper()}-{PARENT}-01", f"00-{'0' * 32}-{PARENT}-01",
    f"00-{TRACE}-{'0' * 16}-01", f"ff-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}-01-extra", f"00-{TRACE[:-1]}-{PARENT}-01",
    f"00_{TRACE}_{PARENT}_01", f"0-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}-1", f"01-{TRACE}-{PARENT}-01extra",
    f"00-{TRACE}-{PARENT}-0g", f" 00-{TRACE}-{PARENT}-01",
])
def test_an_invalid_traceparent_is_no_context(value):
    assert parse_traceparent(value) is None


def test_two_traceparents_are_no_context():
    twice = [("traceparent", f"00-{TRACE}-{PARENT}-01"), ("traceparent", f"00-{TRACE}-{PARENT}-01")]
    assert extract_w3c(twice) is None


# -- through the proxy ---------------------------------------------------------------


def test_otlp_spans_for_a_retried_request(proxy, upstream, flaky, collector):
    (upstream_port, _), (flaky_port, _) = upstream, flaky
    port = free_port()
    proc = proxy.start(retrying_config(port, flaky_port, upstream_port, "opentelemetry", tracer(collector.url("/v1/traces"))))
    before_ns = time.time_ns()
    response = httpx.get(f"http://127.0.0.1:{port}/hello",
                         headers={"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": TRACESTATE})
    after_ns = time.time_ns()
    assert response.status_code == 200
    spans = collector.wait_spans(otlp_spans, 3)
    path, content_type, body = collector.posts[0]
    assert (path, content_type) == ("/v1/traces", "application/json")
    [resource_spans] = body["resourceSpans"]
    assert {"key": "service.name", "value": {"stringValue": "edge"}} in resource_spans["resource"]["attributes"]
    assert resource_spans["scopeSpans"][0]["scope"]["name"] == "outrider"

    [server] = by_url(spans, "/hello")
    first, second = children(spans, server)
    assert len(spans) == 3
    # The incoming context is continued, its tracestate carried along.
    assert (server["traceId"], server["parentSpanId"]) == (TRACE, PARENT)
    assert re.fullmatch(HEX16, server["spanId"]) and server["spanId"] != PARENT
    assert server["traceState"] == TRACESTATE
    assert server["name"] == "GET everything"
    start, end = int(server["startTimeUnixNano"]), int(server["endTimeUnixNano"])
    assert isinstance(server["startTimeUnixNano"], str) and before_ns <= start < end
    assert end <= after_ns + 50_000_000  # it ends as the stream is torn down, just after the response went out
    assert server["status"] == {}
    server_attributes = attributes(server)
    assert server_attributes["http.method"] == "GET"
    assert server_attributes["http.url"] == f"http://127.0.0.1:{port}/hello"
    assert server_attributes["http.status_code"] == 200
    assert server_attributes["guid:x-request-id"] == response.headers["x-request-id"]
    assert server_attributes["route_name"] == "everything"
    assert server_attributes["upstream_cluster"] == "backend"
    assert server_attributes["network.peer.address"] == "127.0.0.1"
    assert (server_attributes["network.local.address"], server_attributes["network.local.port"]) == ("127.0.0.1", port)

    for attempt, address in ((first, flaky_port), (second, upstream_port)):
        assert attempt["kind"] == 3 and attempt["traceId"] == TRACE
        assert attempt["name"] == "router backend egress"
        assert attributes(attempt)["upstream_address"] == f"127.0.0.1:{address}"
        assert attributes(attempt)["network.peer.port"] == address
        assert start <= int(attempt["startTimeUnixNano"]) <= int(attempt["endTimeUnixNano"]) <= end
    assert attributes(first)["http.status_code"] == 503 and first["status"]["code"] == 2
    assert attributes(second)["http.status_code"] == 200 and second["status"] == {}

    upstream_saw = seen_by_upstream(response)
    assert upstream_saw["traceparent"] == f"00-{TRACE}-{second['spanId']}-01"
    assert upstream_saw["tracestate"] == TRACESTATE
    assert proc.wait_stat("tracing.opentelemetry.spans_sent", 3) == 3


MALFORMED = [
    f"00-{TRACE.upper()}-{PARENT}-01",
    f"00-{'0' * 32}-{PARENT}-01",
    f"00-{TRACE}-{'0' * 16}-01",
    f"ff-{TRACE}-{PARENT}-01",
    f"00-{TRACE}-{PARENT}-01-trailing",
    f"00-{TRACE[:20]}-{PARENT}-01",
    "not a traceparent at all",
]


def test_a_malformed_traceparent_starts_a_fresh_trace_and_is_not_forwarded(proxy, upstream, collector):
    upstream_port, _ = upstream
    port = free_port()
    proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], "opentelemetry", tracer(collector.url("/v1/traces"))))
    seen = [seen_by_upstream(httpx.get(f"http://127.0.0.1:{port}/bad/{i}",
                                       headers={"traceparent": value, "tracestate": "vendor=garbage"}))
            for i, value in enumerate(MALFORMED)]
    spans = collector.wait_spans(otlp_spans, 2 * len(MALFORMED))
    for i, value in enumerate(MALFORMED):
        [server] = by_url(spans, f"/bad/{i}")
        [client] = children(spans, server)
        assert server["parentSpanId"] == "" and re.fullmatch(HEX32, server["traceId"]), value
        assert server["traceId"] != TRACE
        assert seen[i]["traceparent"] == f"00-{server['traceId']}-{client['spanId']}-01"
        assert "tracestate" not in seen[i]  # it belonged to the context that was thrown away


def test_the_sampling_decision(proxy, upstream, collector):
    upstream_port, _ = upstream
    url = collector.url("/v1/traces")
    never = free_port()
    proc = proxy.start(config(never, [f"127.0.0.1:{upstream_port}"], "opentelemetry", tracer(url), sampling=0))
    unsampled = seen_by_upstream(httpx.get(f"http://127.0.0.1:{never}/not-sampled"))
    httpx.get(f"http://127.0.0.1:{never}/client-sampled", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
    always = free_port()
    proxy.start(config(always, [f"127.0.0.1:{upstream_port}"], "opentelemetry", tracer(url), sampling=100))
    declined = seen_by_upstream(httpx.get(f"http://127.0.0.1:{always}/declined",
                                          headers={"traceparent": f"00-{TRACE}-{PARENT}-00", "tracestate": "a=b"}))
    httpx.get(f"http://127.0.0.1:{always}/sampled")

    # Spans go out in order: the last request's come last.
    spans = collector.settled_spans(otlp_spans, 4)
    assert len(spans) == 4 and by_url(spans, "/sampled")
    assert not by_url(spans, "/not-sampled") and not by_url(spans, "/declined")
    assert by_url(spans, "/client-sampled")[0]["parentSpanId"] == PARENT
    # Not recorded, yet propagated with the not-sampled flag.
    assert re.fullmatch(rf"00-{HEX32}-{HEX16}-00", unsampled["traceparent"])
    assert re.fullmatch(rf"00-{TRACE}-{HEX16}-00", declined["traceparent"])
    assert PARENT not in declined["traceparent"] and declined["tracestate"] == "a=b"
    assert proc.stat("tracing.not_sampled") == 1


def test_a_collector_answering_500_costs_a_stat_not_requests(proxy, upstream, failing_collector):
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], "opentelemetry",
                              tracer(failing_collector.url("/v1/traces"))))
    with httpx.Client() as client:
        for _ in range(5):
            started = time.monotonic()
            assert client.get(f"http://127.0.0.1:{port}/").status_code == 200
            assert time.monotonic() - started < 0.5
    assert proc.wait_stat("tracing.opentelemetry.reports_failed", 1) >= 1
    assert proc.wait_stat("tracing.opentelemetry.spans_dropped", 10) == 10


def test_validate_refuses_a_collector_url_that_does_not_parse(tmp_path):
    result = validate(tmp_path, """
tracing:
  provider:
    name: opentelemetry
    config: {collector: "localhost:4318/v1/traces"}
listeners: []
clusters: []
""")
    assert result.returncode != 0
    assert re.search(r"tracing\.yaml:5:25: tracing\.provider\.config\.collector: expected an http:// or https:// URL",
                     result.stderr), result.stderr
