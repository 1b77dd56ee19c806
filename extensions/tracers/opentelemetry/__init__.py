"""opentelemetry: W3C Trace Context propagation, and spans exported as
OTLP/HTTP JSON to a collector.

An incoming ``traceparent`` is ``{version}-{trace-id}-{parent-id}-{flags}``
in lower-case hex. It counts as absent, so the core starts a fresh trace,
when anything is off: the wrong length or separators, upper-case or non-hex
characters, an all-zero id, version ``ff``, version ``00`` with anything
after the flags, or the header given twice. ``tracestate`` goes upstream
unchanged beside a valid ``traceparent``, and is dropped with an invalid one.
The parsing and formatting below are pure functions of strings.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping

from outrider import BuildContext, Extension, __version__, hookimpl
from outrider.tracing import CLIENT, SERVER, BatchExporter, Span, SpanContext, Tracer, find_headers

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
W3C_HEADERS = frozenset((TRACEPARENT, TRACESTATE))

# A later version may append fields after the flags, each behind a "-".
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.ASCII | re.DOTALL)
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16

#: OTLP's SpanKind numbers.
_KINDS = {SERVER: 2, CLIENT: 3}
_STATUS_ERROR = 2


def parse_traceparent(value: str) -> SpanContext | None:
    """The context of a ``traceparent`` value; ``None`` when invalid."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    return SpanContext(trace_id, span_id, None, bool(int(flags, 16) & 1))


def extract_w3c(headers: Iterable[tuple[str, str]]) -> SpanContext | None:
    """The W3C context of a request (``traceparent`` and ``tracestate``)."""
    found = find_headers(headers, W3C_HEADERS)
    parent = found.get(TRACEPARENT)
    if parent is None:
        return None
    context = parse_traceparent(parent)  # given twice, it was joined with "," and fails here
    if context is not None:
        context.tracestate = found.get(TRACESTATE)
    return context


def w3c_headers(context: SpanContext) -> list[tuple[str, str]]:
    headers = [(TRACEPARENT, f"00-{context.trace_id}-{context.span_id}-{'01' if context.sampled else '00'}")]
    if context.tracestate:
        headers.append((TRACESTATE, context.tracestate))
    return headers


# -- OTLP/HTTP JSON -----------------------------------------------------------------


def otlp_value(value: Any) -> dict[str, Any]:
    """An OTLP ``AnyValue`` (int64 is a string in protobuf's JSON mapping)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    return {"stringValue": str(value)}


def otlp_attributes(items: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [{"key": key, "value": otlp_value(value)} for key, value in items]


def otlp_span(span: Span) -> dict[str, Any]:
    """A finished span in OTLP's JSON form. Endpoints become the
    ``network.peer.*`` and ``network.local.*`` attributes; the ``error`` tag
    becomes an error status."""
    context = span.context
    tags = dict(span.tags)
    error = tags.pop("error", None)
    for prefix, endpoint in (("network.local", span.local), ("network.peer", span.remote)):
        if endpoint is not None and endpoint.ip:
            tags[f"{prefix}.address"] = endpoint.ip
        if endpoint is not None and endpoint.port:
            tags[f"{prefix}.port"] = endpoint.port
    out: dict[str, Any] = {
        "traceId": context.trace_id,
        "spanId": context.span_id,
        "parentSpanId": context.parent_id or "",
        "name": span.name,
        "kind": _KINDS[span.kind],
        "startTimeUnixNano": str(span.start_ns),
        "endTimeUnixNano": str(span.end_ns),
        "attributes": otlp_attributes(tags.items()),
        "status": {"code": _STATUS_ERROR, "message": str(error)} if error is not None else {},
    }
    if context.tracestate:
        out["traceState"] = context.tracestate
    return out


class OpenTelemetryTracer(Tracer):
    propagation_headers = W3C_HEADERS

    def __init__(self, config: Mapping[str, Any], ctx: BuildContext) -> None:
        self.service_name: str = config.get("service_name", "outrider")
        self.resource = {
            "attributes": otlp_attributes([("service.name", self.service_name), *config.get("resource_attributes", {}).items()])
        }
        self.exporter = BatchExporter.from_config("opentelemetry", config, ctx, self.encode)

    def extract(self, headers: Iterable[tuple[str, str]]) -> SpanContext | None:
        return extract_w3c(headers)

    def context_headers(self, context: SpanContext) -> list[tuple[str, str]]:
        return w3c_headers(context)

    def encode(self, spans: list[Span]) -> bytes:
        """A batch as the body of ``POST /v1/traces`` (an ExportTraceServiceRequest)."""
        request = {
            "resourceSpans": [{
                "resource": self.resource,
                "scopeSpans": [{
                    "scope": {"name": "outrider", "version": __version__},
                    "spans": [otlp_span(span) for span in spans],
                }],
            }]
        }
        return json.dumps(request, separators=(",", ":")).encode()


def create(config: Mapping[str, Any], ctx: BuildContext) -> OpenTelemetryTracer:
    return OpenTelemetryTracer(config, ctx)


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="opentelemetry",
            category="tracers",
            factory=create,
            status="alpha",
            security_posture="robust_to_untrusted_downstream",
            description="W3C traceparent/tracestate propagation; spans exported as OTLP/HTTP JSON in batches.",
        )
    )
