"""The zipkin tracer through the real proxy: a real HTTP collector checks the
spans (fields, tags, parent/child ids), a real echo upstream shows what
context it was given, and collectors that fail, hang or are not there must
not touch requests."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from outrider.extensions.tracers.zipkin import (
    b3_multi_headers, b3_single_header, extract_b3, parse_b3_multi, parse_b3_single,
)
from outrider.tracing import SpanContext
from support import free_port, start_raw
from tracing_support import (
    Collector, HEX16, HEX32, config, hanging_collector, request_headers, retrying_config, seen_by_upstream, validate,
)

B3_NAMES = {"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"}
TRACE64, TRACE128 = "463ac35c9f6413ad", "80f198ee56343ba864fe8b2a57d3eff7"
SPAN, PARENT = "a2fb4a1d1a96d312", "05e3ac9a4f6e3b90"


def zipkin_spans(body: list) -> list:
    return body


def tracer(collector_url: str, extra: str = "") -> str:
    return f'{{collector: "{collector_url}", service_name: edge, flush_interval: 50ms{extra}}}'


def by_url(spans: list[dict], suffix: str, kind: str = "SERVER") -> list[dict]:
    return [s for s in spans if s["kind"] == kind and s["tags"].get("http.url", "").endswith(suffix)]


def children(spans: list[dict], parent: dict) -> list[dict]:
    return sorted((s for s in spans if s.get("parentId") == parent["id"]), key=lambda s: s["timestamp"])


# -- B3 parsing and formatting (pure functions) ---------------------------------------


@pytest.mark.parametrize("value, expected", [
    (f"{TRACE64}-{SPAN}", SpanContext(TRACE64, SPAN)),
    (f"{TRACE128}-{SPAN}-1", SpanContext(TRACE128, SPAN, None, True)),
    (f"{TRACE128}-{SPAN}-0-{PARENT}", SpanContext(TRACE128, SPAN, PARENT, False)),
    (f"{TRACE64}-{SPAN}-d", SpanContext(TRACE64, SPAN, None, True, True)),
    ("0", SpanContext("", "", None, False)),
    ("1", SpanContext("", "", None, True)),
    ("d", SpanContext("", "", None, True, True)),
])
def test_b3_single_values(value, expected):
    assert parse_b3_single(value) == expected


@pytest.mark.parametrize("value", [
    "", "garbage", TRACE64, f"{TRACE64}-{SPAN}-x", f"{TRACE64}-{SPAN}-1-{PARENT}-1", f"{TRACE64.upper()}-{SPAN}",
    f"{'0' * 16}-{SPAN}", f"{TRACE64}-{'0' * 16}", f"{TRACE64[:-1]}-{SPAN}", f"{TRACE64}-{SPAN}-1-zz",
    f"{TRACE64}-{SPAN}--{PARENT}", f"{TRACE128}0-{SPAN}", "2",
])
def test_malformed_b3_single_values_are_no_context(value):
    assert parse_b3_single(value) is None


def test_b3_multi_headers():
    assert parse_b3_multi({"x-b3-traceid": TRACE64, "x-b3-spanid": SPAN, "x-b3-sampled": "1"}) == \
        SpanContext(TRACE64, SPAN, None, True)
    assert parse_b3_multi({"x-b3-traceid": TRACE128, "x-b3-spanid": SPAN, "x-b3-parentspanid": PARENT,
                           "x-b3-flags": "1"}) == SpanContext(TRACE128, SPAN, PARENT, None, True)
    assert parse_b3_multi({"x-b3-sampled": "false"}) == SpanContext("", "", None, False)
    assert parse_b3_multi({}) is None
    for bad in ({"x-b3-traceid": TRACE64}, {"x-b3-spanid": SPAN}, {"x-b3-parentspanid": PARENT},
                {"x-b3-traceid": TRACE64, "x-b3-spanid": SPAN, "x-b3-sampled": "yes"},
                {"x-b3-traceid": TRACE64, "x-b3-spanid": SPAN, "x-b3-flags": "2"},
                {"x-b3-traceid": TRACE64, "x-b3-spanid": SPAN, "x-b3-parentspanid": "0" * 16},
                {"x-b3-traceid": f"{TRACE64},{TRACE64}", "x-b3-spanid": SPAN}):
        assert parse_b3_multi(bad) is None, bad


def test_the_single_header_wins_and_repeated_headers_are_malformed():
    both = [("b3", f"{TRACE128}-{SPAN}-1"), ("x-b3-traceid", TRACE64), ("x-b3-spanid", PARENT)]
    assert extract_b3(both) == SpanContext(TRACE128, SPAN, None, True)
    assert extract_b3([("x-b3-traceid", TRACE64), ("x-b3-spanid", SPAN), ("x-b3-spanid", PARENT)]) is None
    assert extract_b3([("accept", "*/*")]) is None


def test_b3_injection_forms():
    context = SpanContext(TRACE128, SPAN, PARENT, True)
    assert b3_multi_headers(context) == [("x-b3-traceid", TRACE128), ("x-b3-spanid", SPAN),
                                         ("x-b3-parentspanid", PARENT), ("x-b3-sampled", "1")]
    assert b3_single_header(context) == ("b3", f"{TRACE128}-{SPAN}-1-{PARENT}")
    unsampled = SpanContext(TRACE64, SPAN, None, False)
    assert b3_multi_headers(unsampled)[-1] == ("x-b3-sampled", "0")
    assert b3_single_header(unsampled) == ("b3", f"{TRACE64}-{SPAN}-0")
    debug = SpanContext(TRACE64, SPAN, None, True, True)
    assert b3_multi_headers(debug)[-1] == ("x-b3-flags", "1")
    assert b3_single_header(debug) == ("b3", f"{TRACE64}-{SPAN}-d")


# -- through the proxy ---------------------------------------------------------------


def test_a_retried_request_has_a_server_span_and_a_client_span_per_attempt(proxy, upstream, flaky, collector):
    (upstream_port, _), (flaky_port, flaky_received) = upstream, flaky
    port = free_port()
    proc = proxy.start(retrying_config(port, flaky_port, upstream_port, "zipkin", tracer(collector.url("/api/v2/spans")),
                                       http_extra="debug: {header: x-outrider-debug, allow_from: [127.0.0.0/8]}"))
    before_us = time.time() * 1e6
    response = httpx.get(f"http://127.0.0.1:{port}/hello?x=1")
    after_us = time.time() * 1e6
    assert response.status_code == 200
    spans = collector.wait_spans(zipkin_spans, 3)
    # The same with the debug header: its attempts are traced too.
    debugged = httpx.get(f"http://127.0.0.1:{port}/debugged", headers={"x-outrider-debug": "1"})
    assert "attempts=2" in debugged.headers["x-outrider-debug"]
    all_spans = collector.wait_spans(zipkin_spans, 6)
    assert collector.posts[0][:2] == ("/api/v2/spans", "application/json")

    [server] = by_url(spans, "/hello?x=1")
    first, second = children(spans, server)
    assert len(spans) == 3
    trace_id = server["traceId"]
    assert re.fullmatch(HEX32, trace_id) and re.fullmatch(HEX16, server["id"]) and "parentId" not in server
    assert server["name"] == "GET everything"
    assert server["localEndpoint"] == {"serviceName": "edge", "ipv4": "127.0.0.1", "port": port}
    assert server["remoteEndpoint"]["ipv4"] == "127.0.0.1" and server["remoteEndpoint"]["port"] > 0
    assert server["shared"] is False
    assert server["tags"] == {
        "component": "proxy",
        "http.method": "GET",
        "http.url": f"http://127.0.0.1:{port}/hello?x=1",
        "http.status_code": "200",
        "guid:x-request-id": response.headers["x-request-id"],
        "route_name": "everything",
        "upstream_cluster": "backend",
        "upstream_address": f"127.0.0.1:{upstream_port}",
    }
    assert before_us <= server["timestamp"] <= after_us
    # It ends as the stream is torn down, just after the response went out.
    assert 0 < server["duration"] <= after_us - server["timestamp"] + 50_000

    for attempt, address in ((first, flaky_port), (second, upstream_port)):
        assert attempt["traceId"] == trace_id and attempt["kind"] == "CLIENT" and attempt["id"] != server["id"]
        assert attempt["name"] == "router backend egress"
        assert attempt["remoteEndpoint"] == {"ipv4": "127.0.0.1", "port": address}
        assert attempt["localEndpoint"]["serviceName"] == "edge"
        assert attempt["tags"]["upstream_cluster"] == "backend"
        assert attempt["tags"]["upstream_address"] == f"127.0.0.1:{address}"
        assert server["timestamp"] <= attempt["timestamp"]
        assert attempt["timestamp"] + attempt["duration"] <= server["timestamp"] + server["duration"] + 1
    assert first["tags"]["http.status_code"] == "503" and first["tags"]["error"] == "true"
    assert second["tags"]["http.status_code"] == "200" and "error" not in second["tags"]
    assert first["timestamp"] + first["duration"] <= second["timestamp"] + 1

    # Each attempt carried its own span's context upstream.
    flaky_saw = request_headers(flaky_received[0])
    assert (flaky_saw["x-b3-traceid"], flaky_saw["x-b3-spanid"]) == (trace_id, first["id"])
    upstream_saw = seen_by_upstream(response)
    assert upstream_saw["x-b3-traceid"] == trace_id
    assert upstream_saw["x-b3-spanid"] == second["id"]
    assert upstream_saw["x-b3-parentspanid"] == server["id"]
    assert upstream_saw["x-b3-sampled"] == "1"
    assert "b3" not in upstream_saw  # b3_multi only, by default

    [debug_server] = by_url(all_spans, "/debugged")
    assert len(children(all_spans, debug_server)) == 2
    assert proc.wait_stat("tracing.zipkin.spans_sent", 6) == 6
    assert proc.stat("tracing.zipkin.reports_sent") >= 1
    assert proc.stat("tracing.sampled") == 2


def test_an_incoming_b3_context_is_continued(proxy, upstream, collector):
    upstream_port, _ = upstream
    port = free_port()
    proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], "zipkin", tracer(collector.url("/api/v2/spans"))))
    cases = {
        "/multi64": ({"x-b3-traceid": TRACE64, "x-b3-spanid": SPAN, "x-b3-sampled": "1"}, TRACE64),
        "/multi128": ({"x-b3-traceid": TRACE128, "x-b3-spanid": SPAN, "x-b3-parentspanid": PARENT}, TRACE128),
        "/single": ({"b3": f"{TRACE128}-{SPAN}-1-{PARENT}"}, TRACE128),
    }
    seen = {path: seen_by_upstream(httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers))
            for path, (headers, _) in cases.items()}
    spans = collector.wait_spans(zipkin_spans, 2 * len(cases))
    for path, (_, trace_id) in cases.items():
        [server] = by_url(spans, path)
        [client] = children(spans, server)
        assert (server["traceId"], server["parentId"]) == (trace_id, SPAN), path
        assert client["traceId"] == trace_id
        upstream_saw = seen[path]
        assert upstream_saw["x-b3-traceid"] == trace_id
        assert upstream_saw["x-b3-spanid"] == client["id"]
        assert upstream_saw["x-b3-parentspanid"] == server["id"]
        assert "b3" not in upstream_saw


MALFORMED = [
    {"x-b3-traceid": "not-hex-at-all!", "x-b3-spanid": SPAN},
    {"x-b3-traceid": TRACE64.upper(), "x-b3-spanid": SPAN},
    {"x-b3-traceid": "0" * 32, "x-b3-spanid": SPAN},
    {"x-b3-traceid": TRACE64[:15], "x-b3-spanid": SPAN},
    {"x-b3-traceid": TRACE64},
    {"x-b3-traceid": TRACE64, "x-b3-spanid": SPAN, "x-b3-sampled": "perhaps"},
    {"b3": "garbage-in"},
    {"b3": f"{TRACE64}-{SPAN}-x-{PARENT}"},
]


def test_malformed_b3_starts_a_fresh_trace_and_is_not_forwarded(proxy, upstream, collector):
    upstream_port, _ = upstream
    port = free_port()
    proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], "zipkin",
                       tracer(collector.url("/api/v2/spans"), ", propagation: [b3_multi, b3_single]")))
    seen = [seen_by_upstream(httpx.get(f"http://127.0.0.1:{port}/bad/{i}", headers=headers))
            for i, headers in enumerate(MALFORMED)]
    spans = collector.wait_spans(zipkin_spans, 2 * len(MALFORMED))
    for i, headers in enumerate(MALFORMED):
        [server] = by_url(spans, f"/bad/{i}")
        [client] = children(spans, server)
        assert "parentId" not in server, headers
        assert re.fullmatch(HEX32, server["traceId"])
        upstream_saw = seen[i]
        for name, value in headers.items():
            assert upstream_saw[name] != value, f"{name}: {value} was forwarded"
        # Both configured forms, with the fresh context only.
        assert upstream_saw["x-b3-traceid"] == server["traceId"]
        assert upstream_saw["x-b3-spanid"] == client["id"]
        assert upstream_saw["b3"] == f"{server['traceId']}-{client['id']}-1-{server['id']}"


def test_the_sampling_decision(proxy, upstream, collector):
    upstream_port, _ = upstream
    url = collector.url("/api/v2/spans")
    ids = {"x-b3-traceid": TRACE64, "x-b3-spanid": SPAN}

    never = free_port()
    proc = proxy.start(config(never, [f"127.0.0.1:{upstream_port}"], "zipkin", tracer(url), sampling=0))
    unsampled = seen_by_upstream(httpx.get(f"http://127.0.0.1:{never}/not-sampled"))
    httpx.get(f"http://127.0.0.1:{never}/client-sampled", headers={**ids, "x-b3-sampled": "1"})
    debug = seen_by_upstream(httpx.get(f"http://127.0.0.1:{never}/client-debug", headers={**ids, "x-b3-flags": "1"}))

    always = free_port()
    proxy.start(config(always, [f"127.0.0.1:{upstream_port}"], "zipkin", tracer(url), sampling=100))
    declined = seen_by_upstream(httpx.get(f"http://127.0.0.1:{always}/declined", headers={**ids, "x-b3-sampled": "0"}))
    denied = seen_by_upstream(httpx.get(f"http://127.0.0.1:{always}/denied", headers={"b3": "0"}))
    httpx.get(f"http://127.0.0.1:{always}/sampled")

    # Spans go out in order: the last request's come last.
    spans = collector.settled_spans(zipkin_spans, 6)
    assert len(spans) == 6 and by_url(spans, "/sampled")
    assert not by_url(spans, "/not-sampled") and not by_url(spans, "/declined") and not by_url(spans, "/denied")
    [client_sampled] = by_url(spans, "/client-sampled")
    assert client_sampled["traceId"] == TRACE64 and client_sampled["parentId"] == SPAN
    [client_debug] = by_url(spans, "/client-debug")
    assert client_debug["debug"] is True

    # Not recorded, but the trace and the decision still reach the upstream.
    assert re.fullmatch(HEX32, unsampled["x-b3-traceid"]) and re.fullmatch(HEX16, unsampled["x-b3-spanid"])
    assert unsampled["x-b3-sampled"] == "0" and "x-b3-parentspanid" not in unsampled
    assert (declined["x-b3-traceid"], declined["x-b3-parentspanid"], declined["x-b3-sampled"]) == (TRACE64, SPAN, "0")
    assert declined["x-b3-spanid"] not in (SPAN, "")
    assert re.fullmatch(HEX32, denied["x-b3-traceid"]) and denied["x-b3-sampled"] == "0"
    assert debug["x-b3-flags"] == "1" and "x-b3-sampled" not in debug
    assert (proc.stat("tracing.sampled"), proc.stat("tracing.not_sampled")) == (2, 1)


def test_errors_are_tagged_on_both_spans(proxy, collector):
    def misbehave(data: bytes, transport) -> None:
        if data.startswith(b"GET /reset "):
            transport.abort()
        elif data.startswith(b"GET /unavailable "):
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        # /stall: never answered

    server, upstream_port, _ = start_raw(misbehave)
    try:
        port = free_port()
        proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], "zipkin", tracer(collector.url("/api/v2/spans")),
                           route_extra=", timeout: 300ms"))
        statuses = [httpx.get(f"http://127.0.0.1:{port}{path}").status_code
                    for path in ("/unavailable", "/reset", "/stall")]
        spans = collector.wait_spans(zipkin_spans, 6)
    finally:
        server.stop()
    assert statuses == [503, 502, 504]
    expected = {
        "/unavailable": ("503", "true", "503", "true"),
        # The upstream closes instead of answering: a connection termination.
        "/reset": ("502", "upstream_reset_before_response_started{connection_termination}", None, "connection_termination"),
        "/stall": ("504", "upstream_response_timeout", None, "timeout"),
    }
    for path, (status, error, client_status, client_error) in expected.items():
        [server_span] = by_url(spans, path)
        [client] = children(spans, server_span)
        assert server_span["tags"]["http.status_code"] == status
        assert server_span["tags"]["error"] == error, path
        assert client["tags"].get("http.status_code") == client_status
        assert client["tags"]["error"] == client_error, path
    assert by_url(spans, "/reset")[0]["tags"]["response_flags"] == "UC"
    assert by_url(spans, "/stall")[0]["tags"]["response_flags"] == "UT"


def test_a_per_try_timeout_ends_its_attempt_span_and_the_retry_gets_its_own(proxy, upstream, collector):
    server, stall_port, _ = start_raw(lambda data, transport: None)  # never answers
    try:
        port = free_port()
        proxy.start(config(port, [f"127.0.0.1:{stall_port}", f"127.0.0.1:{upstream[0]}"], "zipkin",
                           tracer(collector.url("/api/v2/spans")),
                           route_extra=", retry_policy: {retry_on: [5xx], num_retries: 1, per_try_timeout: 200ms}"))
        assert httpx.get(f"http://127.0.0.1:{port}/slow-first").status_code == 200
        spans = collector.wait_spans(zipkin_spans, 3)
    finally:
        server.stop()
    [server_span] = by_url(spans, "/slow-first")
    first, second = sorted(children(spans, server_span), key=lambda s: s["timestamp"])
    assert first["tags"]["upstream_address"] == f"127.0.0.1:{stall_port}"
    assert first["tags"]["error"] == "per_try_timeout" and "http.status_code" not in first["tags"]
    assert 150_000 <= first["duration"] < 2_000_000  # microseconds: the 200ms per-try timeout
    assert second["tags"]["upstream_address"] == f"127.0.0.1:{upstream[0]}"
    assert second["tags"]["http.status_code"] == "200" and "error" not in second["tags"]
    assert second["timestamp"] >= first["timestamp"] + first["duration"] - 1000
    assert server_span["tags"]["http.status_code"] == "200"


def timed_requests(port: int, count: int) -> list[float]:
    """``count`` sequential GETs on one connection; each one's seconds (all must be 200)."""
    took = []
    with httpx.Client() as client:
        for i in range(count):
            started = time.monotonic()
            assert client.get(f"http://127.0.0.1:{port}/r/{i}").status_code == 200
            took.append(time.monotonic() - started)
    return took


def test_a_collector_answering_500_costs_a_stat_not_requests(proxy, upstream, failing_collector):
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], "zipkin",
                              tracer(failing_collector.url("/api/v2/spans"))))
    assert max(timed_requests(port, 20)) < 0.5
    assert proc.wait_stat("tracing.zipkin.reports_failed", 1) >= 1
    assert proc.wait_stat("tracing.zipkin.spans_dropped", 40) == 40
    assert proc.stat("tracing.zipkin.spans_sent") == 0
    assert failing_collector.posts, "the collector was asked"
    assert "sending" in proc.output() and "answered 500" in proc.output()


def test_a_hanging_collector_neither_slows_requests_nor_grows_memory(proxy, upstream):
    hung, hung_port = hanging_collector()
    try:
        upstream_port, _ = upstream
        port = free_port()
        proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], "zipkin", tracer(
            f"http://127.0.0.1:{hung_port}/api/v2/spans", ", timeout: 1s, max_batch: 10, max_pending_spans: 50")))
        took = timed_requests(port, 200)
        # A request held up by the export would take the export's 1s timeout.
        assert max(took) < 0.5, max(took)
        # 400 spans: at most 50 wait and 10 are in the hanging report; the rest were dropped.
        assert proc.wait_stat("tracing.zipkin.spans_dropped", 340) >= 340
        assert proc.wait_stat("tracing.zipkin.reports_failed", 1, timeout=3) >= 1
        assert "no answer within 1s" in proc.output()
    finally:
        proc.stop()
        hung.stop()


def test_a_collector_that_is_not_there_costs_a_stat(proxy, upstream):
    upstream_port, _ = upstream
    port, nothing = free_port(), free_port()
    proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], "zipkin",
                              tracer(f"http://127.0.0.1:{nothing}/api/v2/spans")))
    assert max(timed_requests(port, 5)) < 0.5
    assert proc.wait_stat("tracing.zipkin.reports_failed", 1) >= 1
    assert proc.wait_stat("tracing.zipkin.spans_dropped", 10) == 10


def test_without_tracing_b3_headers_pass_through_untouched(proxy, upstream):
    upstream_port, _ = upstream
    port = free_port()
    proxy.start(f"""
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http:
      stat_prefix: web
      virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: backend}}}}]}}]
clusters:
  - {{name: backend, endpoints: ["127.0.0.1:{upstream_port}"]}}
""")
    sent = {"x-b3-traceid": "garbage", "x-b3-spanid": SPAN}
    upstream_saw = seen_by_upstream(httpx.get(f"http://127.0.0.1:{port}/", headers=sent))
    assert {k: v for k, v in upstream_saw.items() if k in B3_NAMES} == sent


@pytest.mark.parametrize("collector_value, message", [
    ('"not a url"', "expected an http:// or https:// URL"),
    ('"ftp://127.0.0.1/spans"', "expected an http:// or https:// URL"),
    ('"http:///api/v2/spans"', "(no host)"),
])
def test_validate_refuses_a_collector_url_that_does_not_parse(tmp_path, collector_value, message):
    result = validate(tmp_path, f"""
tracing:
  provider:
    name: zipkin
    config: {{collector: {collector_value}, service_name: edge}}
listeners: []
clusters: []
""")
    assert result.returncode != 0
    assert re.search(r"tracing\.yaml:5:25: tracing\.provider\.config\.collector: ", result.stderr), result.stderr
    assert message in result.stderr


class SlowFirstCollector(Collector):
    """A collector that takes 300 ms to answer its first report."""

    async def _receive(self, request):
        if not self.posts:
            await asyncio.sleep(0.3)
        return await super()._receive(request)


def test_spans_are_batched_up_to_max_batch_per_post(proxy, upstream, flaky):
    """With an hour's flush interval, only max_batch (3) waiting spans
    trigger a report: a retried request's three spans (a server span and
    two attempts) go in one POST. Spans that pile up while a report is in
    flight go out max_batch at a time; the rest goes at shutdown."""
    (upstream_port, _), (flaky_port, _) = upstream, flaky
    collector = SlowFirstCollector()
    try:
        port = free_port()
        tracer_config = f'{{collector: "{collector.url("/api/v2/spans")}", flush_interval: 1h, max_batch: 3}}'
        proc = proxy.start(retrying_config(port, flaky_port, upstream_port, "zipkin", tracer_config))
        with httpx.Client() as client:
            assert client.get(f"http://127.0.0.1:{port}/first").status_code == 200
            # Every request is retried once (round robin puts its first attempt on the flaky host).
            for i in range(3):  # while the first report is held up
                assert client.get(f"http://127.0.0.1:{port}/more/{i}").status_code == 200
        first = collector.wait_spans(zipkin_spans, 3)
        assert collector.posts and len(collector.posts[0][2]) == 3
        [server] = by_url(first[:3], "/first")
        assert sorted(s["kind"] for s in first[:3]) == ["CLIENT", "CLIENT", "SERVER"]
        assert {s["traceId"] for s in first[:3]} == {server["traceId"]}
        assert proc.stop() == 0  # what is left (fewer than max_batch) is sent at shutdown
        spans = collector.wait_spans(zipkin_spans, 12)
        assert len(spans) == 12 and len({s["id"] for s in spans}) == 12
        sizes = [len(body) for _, _, body in collector.posts]
        assert all(1 <= n <= 3 for n in sizes), sizes
        assert len(sizes) >= 4, sizes
    finally:
        collector.stop()
