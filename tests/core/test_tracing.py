"""The core's part of tracing, without sockets: the sampling decision, span
bookkeeping, header injection and the exporter's bounded queue. (The
tracers, through the real proxy and real collectors, are tested under
tests/extensions/tracers/.)"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from outrider.context import BuildContext
from outrider.http.message import Headers, RequestHead
from outrider.registry import Registry
from outrider.stats import StatsStore
from outrider.tracing import (
    CLIENT, SERVER, BatchExporter, HttpTracing, NonRecordingSpan, Span, SpanContext, Tracer, TracingStats,
    find_headers, new_id,
)

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class StubTracer(Tracer):
    """Extracts whatever the test says; injects one ``x-trace`` header."""

    propagation_headers = frozenset(("x-trace",))

    def __init__(self, incoming: SpanContext | None = None) -> None:
        self.incoming = incoming
        self.reported: list[Span] = []

    def extract(self, headers: Headers) -> SpanContext | None:
        return self.incoming

    def context_headers(self, context: SpanContext) -> list[tuple[str, str]]:
        return [("x-trace", f"{context.trace_id}/{context.span_id}/{int(bool(context.sampled))}")]

    def report(self, span: Span) -> None:
        self.reported.append(span)


def tracing(incoming: SpanContext | None = None, sampling: float = 100) -> tuple[HttpTracing, StatsStore]:
    store = StatsStore()
    return HttpTracing(StubTracer(incoming), sampling, TracingStats(store.scope("tracing"))), store


def stream() -> SimpleNamespace:
    request = RequestHead("GET", "/a?b=1", "example.com", Headers([("x-trace", "stale")]))
    return SimpleNamespace(
        request=request, route=SimpleNamespace(name="api/0"), request_id="rid-1",
        connection=SimpleNamespace(remote_ip="10.0.0.7", remote_port=5555),
    )


def test_a_fresh_sampled_trace_gets_a_server_span_with_its_tags():
    t, store = tracing(sampling=100)
    span = t.start_server_span(stream())
    assert isinstance(span, Span) and span.kind == SERVER and span.name == "GET api/0"
    context = span.context
    assert re.fullmatch(r"[0-9a-f]{32}", context.trace_id) and re.fullmatch(r"[0-9a-f]{16}", context.span_id)
    assert context.parent_id is None and context.sampled is True
    assert span.remote == ("10.0.0.7", 5555)
    assert span.tags == {"component": "proxy", "http.method": "GET", "http.url": "http://example.com/a?b=1",
                         "guid:x-request-id": "rid-1", "route_name": "api/0"}
    assert store.counter("tracing.sampled").value == 1


@pytest.mark.parametrize("incoming, sampling, recorded", [
    (None, 0, False),
    (SpanContext(TRACE, SPAN, None, True), 0, True),     # the client's "sampled" wins over 0%
    (SpanContext(TRACE, SPAN, None, False), 100, False),  # and its "not sampled" over 100%
    (SpanContext(TRACE, SPAN, None, None), 100, True),    # no decision: ours
    (SpanContext(TRACE, SPAN, None, None), 0, False),
    (SpanContext(TRACE, SPAN, None, None, debug=True), 0, True),
    (SpanContext("", "", None, False), 100, False),       # a decision without ids (b3: 0)
])
def test_the_sampling_decision(incoming, sampling, recorded):
    t, _ = tracing(incoming, sampling)
    span = t.start_server_span(stream())
    assert span.recording is recorded
    assert span.context.sampled is recorded
    if incoming is not None and incoming.trace_id:
        assert (span.context.trace_id, span.context.parent_id) == (TRACE, SPAN)
        assert span.context.span_id != SPAN
    else:
        assert span.context.trace_id != TRACE and span.context.parent_id is None


def test_sampling_is_a_percentage():
    t, store = tracing(sampling=25)
    recorded = sum(t.start_server_span(stream()).recording for _ in range(4000))
    assert 800 < recorded < 1200
    assert store.counter("tracing.sampled").value + store.counter("tracing.not_sampled").value == 4000


def test_an_unsampled_request_still_propagates_and_records_nothing():
    t, _ = tracing(SpanContext(TRACE, SPAN, None, False))
    span = t.start_server_span(stream())
    assert isinstance(span, NonRecordingSpan)
    assert span.child("router x egress") is span
    headers = Headers([("accept", "*/*"), ("x-trace", "garbage"), ("x-trace", "more")])
    span.child("attempt").inject(headers)
    assert headers == [("accept", "*/*"), ("x-trace", f"{TRACE}/{span.context.span_id}/0")]
    span.set_tag("error", "true")
    span.finish()
    assert t.tracer.reported == []


def test_client_spans_are_children_and_finish_once():
    t, _ = tracing()
    server = t.start_server_span(stream())
    first, second = server.child("router api egress", ("127.0.0.1", 8080)), server.child("router api egress")
    for client in (first, second):
        assert client.kind == CLIENT and client.context.trace_id == server.context.trace_id
        assert client.context.parent_id == server.context.span_id
    assert first.context.span_id != second.context.span_id
    first.finish()
    first.finish()
    assert t.tracer.reported == [first] and first.duration_ns >= 0
    assert first.end_ns == first.start_ns + first.duration_ns


def test_a_child_span_stays_inside_its_parent_when_the_wall_clock_moves(monkeypatch):
    # CI saw an attempt end 126 us after its server span: each span read the
    # wall clock on its own while NTP slewed it. A step shows it plainly.
    t, _ = tracing()
    server = t.start_server_span(stream())
    wall_at_server_start = server.start_ns
    monkeypatch.setattr("outrider.tracing.time.time_ns", lambda: wall_at_server_start - 3_600_000_000_000)
    client = server.child("router api egress")
    client.finish()
    server.finish()
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns


def test_a_tracer_that_raises_fails_neither_the_request_nor_the_span():
    t, store = tracing()

    def broken(headers: Headers) -> SpanContext | None:
        raise RuntimeError("bug")

    t.tracer.extract = broken  # type: ignore[method-assign]
    span = t.start_server_span(stream())
    assert span.recording and span.context.parent_id is None
    assert store.counter("tracing.extract_error").value == 1
    t.tracer.report = lambda span: 1 / 0  # type: ignore[method-assign]
    span.finish()  # logged, not raised


def test_find_headers_joins_repeats():
    headers = [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4")]
    assert find_headers(headers, frozenset(("a", "c", "z"))) == {"a": "1,3", "c": "4"}


def test_ids():
    assert all(re.fullmatch(r"[0-9a-f]{16}", new_id()) for _ in range(100))
    assert len(new_id(128)) == 32 and len({new_id() for _ in range(1000)}) == 1000


def test_the_exporter_queue_is_bounded_and_drops_the_oldest():
    ctx = BuildContext(Registry(), StatsStore())
    exporter = BatchExporter("test", "http://127.0.0.1:9/spans", lambda spans: b"", ctx, max_pending=3)
    t, _ = tracing()
    spans = [t.start_server_span(stream()) for _ in range(5)]
    for span in spans:
        exporter.add(span)
    assert exporter.pending == 3 and list(exporter._pending) == spans[2:]
    assert ctx.stats.counter("tracing.test.spans_dropped").value == 2


@pytest.mark.parametrize("kwargs", [{"flush_interval": 0}, {"timeout": 0}, {"max_batch": 0}, {"max_pending": 0}])
def test_the_exporter_refuses_settings_that_cannot_work(kwargs):
    ctx = BuildContext(Registry(), StatsStore())
    with pytest.raises(ValueError):
        BatchExporter("test", "http://127.0.0.1:9/spans", lambda spans: b"", ctx, **kwargs)
    with pytest.raises(ValueError):
        BatchExporter("test", "127.0.0.1:9", lambda spans: b"", ctx)
