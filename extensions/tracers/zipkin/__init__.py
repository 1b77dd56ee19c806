"""zipkin: B3 propagation, and Zipkin v2 JSON spans POSTed to a collector.

An incoming context is read from the single ``b3`` header when there is one
(``{traceid}-{spanid}[-{sampled}[-{parentspanid}]]``, or a bare decision
``0``, ``1`` or ``d``), and otherwise from the multi headers (``x-b3-traceid``,
``x-b3-spanid``, ``x-b3-parentspanid``, ``x-b3-sampled``, ``x-b3-flags``).
Anything malformed (ids of the wrong length, upper-case or non-hex, all
zero, half a context, an unknown flag) counts as no context: the core starts
a fresh trace, and every B3 header of the request is replaced on its way
upstream. The parsing and formatting below are pure functions of strings.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from typing import Any, Iterable, Mapping

from outrider import BuildContext, Extension, hookimpl
from outrider.tracing import BatchExporter, Endpoint, Span, SpanContext, Tracer, find_headers

B3 = "b3"
TRACE_ID = "x-b3-traceid"
SPAN_ID = "x-b3-spanid"
PARENT_SPAN_ID = "x-b3-parentspanid"
SAMPLED = "x-b3-sampled"
FLAGS = "x-b3-flags"
B3_HEADERS = frozenset((B3, TRACE_ID, SPAN_ID, PARENT_SPAN_ID, SAMPLED, FLAGS))

_HEX = re.compile(r"[0-9a-f]+")
# x-b3-sampled: "1"/"0", and the "true"/"false" of early B3 clients.
_SAMPLED_VALUES = {"1": True, "true": True, "0": False, "false": False}
# The sampling field of the single header; "d" (debug) also means sampled.
_SINGLE_FLAGS = {"1": (True, False), "0": (False, False), "d": (True, True)}


def _valid_id(value: str, *lengths: int) -> bool:
    """Lower-case hex of one of ``lengths`` characters, not all zeros."""
    return len(value) in lengths and _HEX.fullmatch(value) is not None and value.strip("0") != ""


def parse_b3_single(value: str) -> SpanContext | None:
    """The context of a ``b3`` header value; ``None`` when malformed."""
    decision = _SINGLE_FLAGS.get(value)
    if decision is not None:  # only a decision: "b3: 0" says "do not sample"
        return SpanContext("", "", None, decision[0], decision[1])
    parts = value.split("-")
    if not 2 <= len(parts) <= 4 or not _valid_id(parts[0], 16, 32) or not _valid_id(parts[1], 16):
        return None
    sampled, debug = _SINGLE_FLAGS.get(parts[2], (None, None)) if len(parts) > 2 else (None, False)
    if debug is None:
        return None
    parent = parts[3] if len(parts) == 4 else None
    if parent is not None and not _valid_id(parent, 16):
        return None
    return SpanContext(parts[0], parts[1], parent, sampled, debug)


def parse_b3_multi(found: Mapping[str, str]) -> SpanContext | None:
    """The context of the ``x-b3-*`` headers in ``found`` (lower-case name to
    value); ``None`` when there is none or it is malformed."""
    sampled_text, flags = found.get(SAMPLED), found.get(FLAGS)
    sampled = _SAMPLED_VALUES.get(sampled_text) if sampled_text is not None else None
    if (sampled_text is not None and sampled is None) or flags not in (None, "0", "1"):
        return None
    debug = flags == "1"
    trace_id, span_id, parent = found.get(TRACE_ID), found.get(SPAN_ID), found.get(PARENT_SPAN_ID)
    if trace_id is None and span_id is None and parent is None:
        return SpanContext("", "", None, sampled, debug) if sampled is not None or debug else None
    if trace_id is None or span_id is None or not _valid_id(trace_id, 16, 32) or not _valid_id(span_id, 16):
        return None
    if parent is not None and not _valid_id(parent, 16):
        return None
    return SpanContext(trace_id, span_id, parent, sampled, debug)


def extract_b3(headers: Iterable[tuple[str, str]]) -> SpanContext | None:
    """The B3 context of a request: the single header wins over the multi ones."""
    found = find_headers(headers, B3_HEADERS)
    if not found:
        return None
    single = found.get(B3)
    return parse_b3_single(single) if single is not None else parse_b3_multi(found)


def b3_multi_headers(context: SpanContext) -> list[tuple[str, str]]:
    headers = [(TRACE_ID, context.trace_id), (SPAN_ID, context.span_id)]
    if context.parent_id:
        headers.append((PARENT_SPAN_ID, context.parent_id))
    # Debug implies sampled, and B3 says not to send both.
    headers.append((FLAGS, "1") if context.debug else (SAMPLED, "1" if context.sampled else "0"))
    return headers


def b3_single_header(context: SpanContext) -> tuple[str, str]:
    flag = "d" if context.debug else "1" if context.sampled else "0"
    value = f"{context.trace_id}-{context.span_id}-{flag}"
    return (B3, f"{value}-{context.parent_id}" if context.parent_id else value)


# -- Zipkin v2 JSON ----------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _ip_key(ip: str) -> str | None:
    """``ipv4`` or ``ipv6``: the endpoint field for ``ip``; ``None`` for a
    host name or nothing."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    return "ipv4" if address.version == 4 else "ipv6"


def zipkin_endpoint(endpoint: Endpoint, service_name: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"serviceName": service_name} if service_name else {}
    key = _ip_key(endpoint.ip) if endpoint.ip else None
    if key is not None:
        out[key] = endpoint.ip
    if endpoint.port:
        out["port"] = endpoint.port
    return out


def zipkin_span(span: Span, service_name: str) -> dict[str, Any]:
    """A finished span in Zipkin's v2 model."""
    context = span.context
    out: dict[str, Any] = {"traceId": context.trace_id, "id": context.span_id}
    if context.parent_id:
        out["parentId"] = context.parent_id
    out.update(
        name=span.name,
        kind=span.kind,
        timestamp=span.start_ns // 1000,
        duration=max(1, (span.duration_ns or 0) // 1000),  # Zipkin counts whole microseconds, at least one
        localEndpoint=zipkin_endpoint(span.local, service_name),
        tags={key: str(value) for key, value in span.tags.items()},
        shared=False,  # each hop has its own span id; the upstream's server span is a child
    )
    if span.remote is not None:
        out["remoteEndpoint"] = zipkin_endpoint(span.remote)
    if context.debug:
        out["debug"] = True
    return out


class ZipkinTracer(Tracer):
    propagation_headers = B3_HEADERS

    def __init__(self, config: Mapping[str, Any], ctx: BuildContext) -> None:
        self.service_name: str = config.get("service_name", "outrider")
        propagation = config.get("propagation", ["b3_multi"])
        self.multi = "b3_multi" in propagation
        self.single = "b3_single" in propagation
        self.trace_id_bits = 128 if config.get("trace_id_128bit", True) else 64
        self.exporter = BatchExporter.from_config("zipkin", config, ctx, self.encode)

    def extract(self, headers: Iterable[tuple[str, str]]) -> SpanContext | None:
        return extract_b3(headers)

    def context_headers(self, context: SpanContext) -> list[tuple[str, str]]:
        headers = b3_multi_headers(context) if self.multi else []
        if self.single:
            headers.append(b3_single_header(context))
        return headers

    def encode(self, spans: list[Span]) -> bytes:
        """A batch as the body of ``POST /api/v2/spans``."""
        return json.dumps([zipkin_span(span, self.service_name) for span in spans], separators=(",", ":")).encode()


def create(config: Mapping[str, Any], ctx: BuildContext) -> ZipkinTracer:
    return ZipkinTracer(config, ctx)


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="zipkin",
            category="tracers",
            factory=create,
            status="alpha",
            security_posture="robust_to_untrusted_downstream",
            description="B3 trace propagation (multi and single header); Zipkin v2 JSON spans POSTed in batches.",
        )
    )
