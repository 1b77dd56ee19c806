"""Distributed tracing: the contract of the ``tracers`` category, and the
core's part of the work.

Configured once, at the top level of a config::

    tracing:
      provider: {name: zipkin, config: {collector: "http://127.0.0.1:9411/api/v2/spans"}}
      sampling: 100        # percent of requests that start a new trace

Who does what
-------------
A ``tracers`` extension owns a *format*: how a trace context travels in
request headers (B3, W3C ``traceparent``) and how finished spans are encoded
for its collector (Zipkin v2 JSON, OTLP/HTTP JSON). The core owns the rest,
so that every tracer behaves the same way:

- **Sampling.** A request that arrives with a decision keeps it: sampled
  (or B3 debug) is recorded whatever ``sampling`` says; not sampled is not
  recorded, but the decision still goes upstream. Otherwise ``sampling``
  percent of requests are recorded, drawn with a cheap PRNG.
- **Spans.** Ids, wall-clock start times, monotonic durations, tags,
  endpoints and parent/child links (:class:`Span`). The HTTP connection
  manager starts a SERVER span once a request's head is parsed and routed
  (:meth:`HttpTracing.start_server_span`) and finishes it when the stream
  ends; the router starts a CLIENT child per upstream attempt and injects
  that child's context into the attempt's request headers. A request that
  is not sampled gets a :class:`NonRecordingSpan`: same calls, nothing
  recorded, its context still injected.
- **Export.** :class:`BatchExporter` queues finished spans (bounded: the
  oldest are dropped, and counted, when a collector cannot keep up) and
  POSTs them in batches from a task on the event loop, with a timeout.
  Nothing on the request path waits for a collector.

The factory contract
--------------------
``factory(config, ctx)`` is called once per config load (``outrider
validate`` calls it too, so it must not do I/O) and returns a
:class:`Tracer` subclass that provides:

``extract(headers) -> SpanContext | None``
    The incoming context, or ``None`` when the request carries none **or a
    malformed one**: the core then starts a fresh trace, and since
    :meth:`Tracer.inject` replaces every propagation header, nothing of the
    malformed one is forwarded. A context may hold only a decision (empty
    ``trace_id`` and ``span_id``), as B3's ``b3: 0`` does.
``context_headers(context) -> list[tuple[str, str]]``
    The headers that carry ``context`` to the next hop.
``propagation_headers``
    Every (lower-case) header name of the format; :meth:`Tracer.inject`
    removes them all from an upstream request before adding its own.
``exporter``
    A :class:`BatchExporter` (``BatchExporter.from_config`` reads the usual
    keys), which the default :meth:`Tracer.report`, :meth:`Tracer.start` and
    :meth:`Tracer.stop` use. A tracer that exports differently overrides
    those three instead.

Everything runs on the event loop and must not block. ``extract`` and
``context_headers`` see every request, sampled or not, so keep them to
string work (pure functions of the headers are best: easy to test too).

Cost
----
Without ``tracing:`` the connection manager tests ``hcm.tracing is None``
once per request and the router is the plain one (chosen at config time).
A request that is not sampled costs one scan of its headers, two random ids
and, per upstream attempt, the header injection; only sampled requests
allocate spans and tags.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple

import aiohttp

from .config.units import parse_duration, parse_http_url
from .sinks import RateLimitedLog
from .stats import StatsGroup

if TYPE_CHECKING:  # pragma: no cover
    from .context import BuildContext
    from .http.conn_manager import ActiveStream
    from .http.message import Headers

log = logging.getLogger("outrider.tracing")

SERVER = "SERVER"
CLIENT = "CLIENT"

# Ids must be unique, not secret: a PRNG seeded from the OS costs no system
# call per id. Sampling draws from its own, so ids stay independent of it.
_id_bytes = random.Random(os.urandom(32)).randbytes
_sample_draw = random.Random(os.urandom(32)).random
_ZERO_IDS = frozenset(("0" * 16, "0" * 32))  # invalid in B3 and W3C alike

#: Failures inside a tracer's report(); logged, never raised into a stream.
_report_log = RateLimitedLog(log)


def new_id(bits: int = 64) -> str:
    """A random, non-zero id of ``bits`` bits (64 or 128) in lower-case hex."""
    value = _id_bytes(bits // 8).hex()  # the quickest way to random hex
    return value if value not in _ZERO_IDS else new_id(bits)


def find_headers(headers: Iterable[tuple[str, str]], names: frozenset[str]) -> dict[str, str]:
    """The headers named in ``names`` (lower-case), found in one pass. A
    repeated one has its values joined by ``,``, as HTTP combines field lines:
    right for ``tracestate``; a strict parser rejects it elsewhere."""
    found: dict[str, str] = {}
    for name, value in headers:
        if name in names:
            found[name] = f"{found[name]},{value}" if name in found else value
    return found


class Endpoint(NamedTuple):
    """One end of a span: an IP address (``""`` when unknown or a wildcard)
    and a port (0 when unknown)."""

    ip: str
    port: int


NO_ENDPOINT = Endpoint("", 0)


class SpanContext:
    """What travels from hop to hop: the trace, the span that is the next
    hop's parent, and the sampling decision (``None``: not made yet).

    Ids are lower-case hex strings. ``debug`` is B3's "force sampling" flag;
    ``tracestate`` is W3C's vendor data, passed on unchanged.
    """

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "debug", "tracestate")

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str | None = None,
        sampled: bool | None = None,
        debug: bool = False,
        tracestate: str | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.debug = debug
        self.tracestate = tracestate

    def _fields(self) -> tuple[Any, ...]:
        return (self.trace_id, self.span_id, self.parent_id, self.sampled, self.debug, self.tracestate)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpanContext) and self._fields() == other._fields()

    def __repr__(self) -> str:
        return "SpanContext(%r, %r, parent_id=%r, sampled=%r, debug=%r, tracestate=%r)" % self._fields()


class Span:
    """A span being recorded (its request was sampled).

    ``start_ns`` is wall-clock time (``time.time_ns()``); the duration is
    measured on the monotonic clock, so a clock step does not distort it.
    A child span's start is its parent's plus the monotonic time since, so a
    child never falls outside its parent when the wall clock is slewed or
    stepped while the request is in flight.
    Tag values are ``str`` or ``int``; ``error`` holds a short reason.
    """

    __slots__ = ("tracer", "context", "name", "kind", "local", "remote", "tags", "start_ns", "duration_ns", "_started")
    recording = True

    def __init__(
        self,
        tracer: "Tracer",
        context: SpanContext,
        name: str,
        kind: str,
        local: Endpoint,
        remote: Endpoint | None = None,
        parent: "Span | None" = None,
    ) -> None:
        self.tracer = tracer
        self.context = context
        self.name = name
        self.kind = kind
        self.local = local
        self.remote = remote
        self.tags: dict[str, str | int] = {}
        self._started = time.monotonic_ns()
        self.start_ns = time.time_ns() if parent is None else parent.start_ns + (self._started - parent._started)
        #: Set when the span finishes.
        self.duration_ns: int | None = None

    @property
    def end_ns(self) -> int:
        return self.start_ns + (self.duration_ns or 0)

    def child(self, name: str, remote: Endpoint | None = None) -> "Span":
        """A CLIENT span in the same trace, with this one as its parent."""
        ctx = self.context
        context = SpanContext(ctx.trace_id, new_id(), ctx.span_id, True, ctx.debug, ctx.tracestate)
        return Span(self.tracer, context, name, CLIENT, self.local, remote, parent=self)

    def inject(self, headers: "Headers") -> None:
        """Put this span's context in ``headers`` (an upstream request's)."""
        self.tracer.inject(self.context, headers)

    def set_tag(self, key: str, value: str | int) -> None:
        self.tags[key] = value

    def finish(self) -> None:
        """End the span and hand it to the tracer (once; later calls do nothing)."""
        if self.duration_ns is not None:
            return
        self.duration_ns = time.monotonic_ns() - self._started
        try:
            self.tracer.report(self)
        except Exception as exc:  # a tracer's bug loses the span, never the request
            _report_log(logging.ERROR, "tracer %s failed to report a span: %r", type(self.tracer).__name__, exc)


class NonRecordingSpan:
    """The span of a request that is not sampled: it records nothing, but
    carries the trace (with its not-sampled decision) to the upstream."""

    __slots__ = ("tracer", "context")
    recording = False

    def __init__(self, tracer: "Tracer", context: SpanContext) -> None:
        self.tracer = tracer
        self.context = context

    def child(self, name: str, remote: Endpoint | None = None) -> "NonRecordingSpan":
        return self  # nothing to record: every attempt carries this context

    def inject(self, headers: "Headers") -> None:
        self.tracer.inject(self.context, headers)

    def set_tag(self, key: str, value: str | int) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracer:
    """The base class of what a ``tracers`` factory returns (see the module
    docstring for what a subclass provides)."""

    #: Every header name the propagation format reads or writes (lower-case).
    propagation_headers: frozenset[str] = frozenset()
    #: Size of the trace ids of fresh traces: 128 or 64 bits.
    trace_id_bits = 128
    exporter: "BatchExporter | None" = None

    def extract(self, headers: "Headers") -> SpanContext | None:
        """The incoming context; ``None`` when absent or malformed."""
        raise NotImplementedError

    def context_headers(self, context: SpanContext) -> list[tuple[str, str]]:
        """The headers that carry ``context`` to the next hop."""
        raise NotImplementedError

    def inject(self, context: SpanContext, headers: "Headers") -> None:
        """Replace every propagation header in ``headers`` by ``context``'s."""
        names = self.propagation_headers
        headers[:] = [kv for kv in headers if kv[0] not in names]
        headers.extend(self.context_headers(context))

    def report(self, span: Span) -> None:
        """A sampled span finished (on the event loop; must not block)."""
        if self.exporter is not None:
            self.exporter.add(span)

    def start(self) -> None:
        """The server is live (called on the event loop)."""
        if self.exporter is not None:
            self.exporter.start()

    async def stop(self) -> None:
        """The server is stopping, its listeners drained: send what is left."""
        if self.exporter is not None:
            await self.exporter.stop()


class TracingStats(StatsGroup):
    """``tracing.*``: the core's sampling decisions."""

    COUNTERS = ("sampled", "not_sampled", "continued", "extract_error")


class HttpTracing:
    """The ``tracing:`` block, built once per config: the provider's tracer,
    the sampling rate and, in a listener's copy (:meth:`for_listener`), the
    local endpoint of that listener's server spans."""

    def __init__(self, tracer: Tracer, sampling: float, stats: TracingStats, local: Endpoint = NO_ENDPOINT) -> None:
        self.tracer = tracer
        self.sampling = sampling
        self.rate = sampling / 100.0
        self.stats = stats
        self.local = local
        self._extract_log = RateLimitedLog(log)

    def for_listener(self, host: str, port: int) -> "HttpTracing":
        """A copy for the listener bound to ``host:port`` (a wildcard host
        says nothing about the address, so it is left out)."""
        ip = "" if host in ("0.0.0.0", "::", "") else host
        return HttpTracing(self.tracer, self.sampling, self.stats, Endpoint(ip, port))

    def start(self) -> None:
        self.tracer.start()

    async def stop(self) -> None:
        await self.tracer.stop()

    def _sample(self) -> bool:
        rate = self.rate
        return rate >= 1.0 or (rate > 0.0 and _sample_draw() < rate)

    def start_server_span(self, stream: "ActiveStream") -> Span | NonRecordingSpan:
        """The span of ``stream``'s request, started once its head is parsed
        and routed (so the request id and the route are known)."""
        tracer = self.tracer
        request = stream.request
        try:
            incoming = tracer.extract(request.headers)
        except Exception as exc:  # a tracer's bug: trace afresh
            self.stats.extract_error.value += 1
            self._extract_log(logging.ERROR, "tracer %s failed to extract a context: %r", type(tracer).__name__, exc)
            incoming = None
        if incoming is None:
            context = SpanContext(new_id(tracer.trace_id_bits), new_id(), None, self._sample())
        else:
            sampled = True if incoming.debug else incoming.sampled
            if sampled is None:
                sampled = self._sample()
            if incoming.trace_id:
                self.stats.continued.value += 1
                trace_id, parent_id = incoming.trace_id, incoming.span_id
            else:  # a decision only
                trace_id, parent_id = new_id(tracer.trace_id_bits), None
            context = SpanContext(trace_id, new_id(), parent_id, sampled, incoming.debug, incoming.tracestate)
        if not context.sampled:
            self.stats.not_sampled.value += 1
            return NonRecordingSpan(tracer, context)
        self.stats.sampled.value += 1
        route = stream.route
        connection = stream.connection
        name = f"{request.method} {route.name}" if route is not None else request.method
        span = Span(tracer, context, name, SERVER, self.local, Endpoint(connection.remote_ip, connection.remote_port))
        tags = span.tags
        tags["component"] = "proxy"
        tags["http.method"] = request.method
        tags["http.url"] = f"{request.scheme}://{request.authority}{request.path}"
        if stream.request_id:
            tags["guid:x-request-id"] = stream.request_id
        if route is not None:
            tags["route_name"] = route.name
        return span

    def finish_server_span(self, stream: "ActiveStream") -> None:
        """A stream observer: tag the server span with the outcome and end it."""
        span = stream.span
        if span is None or not span.recording:
            return
        tags = span.tags
        response = stream.response
        status = response.status if response is not None and stream.response_started else 0
        if status:
            tags["http.status_code"] = status
        if stream.upstream_cluster:
            tags["upstream_cluster"] = stream.upstream_cluster
        if stream.upstream_host:
            tags["upstream_address"] = stream.upstream_host
        if stream.response_flags:
            tags["response_flags"] = ",".join(stream.response_flags)
        if status >= 500 or not stream.response_complete:
            tags["error"] = stream.response_code_details or "true"
        span.finish()


def build_tracing(block: Mapping[str, Any] | None, ctx: "BuildContext") -> HttpTracing | None:
    """Build the top-level ``tracing:`` block (normalised); ``None`` when absent."""
    if not block:
        return None
    ref = block["provider"]
    tracer = ctx.build("tracers", ref)
    if not isinstance(tracer, Tracer):
        raise TypeError(
            f"tracers extension {ref['name']!r}: its factory must return an outrider.tracing.Tracer "
            f"(got {type(tracer).__name__})"
        )
    return HttpTracing(tracer, float(block.get("sampling", 100)), TracingStats(ctx.stats.scope("tracing")))


# -- export ----------------------------------------------------------------------


class ExporterStats(StatsGroup):
    """``tracing.<name>.*``"""

    COUNTERS = ("spans_sent", "spans_dropped", "reports_sent", "reports_failed")


class CollectorRejected(Exception):
    """The collector answered with a status other than 2xx."""


class BatchExporter:
    """Sends finished spans to an HTTP collector in batches, off the request path.

    :meth:`add` (on the request path) appends to a bounded queue; when it is
    full the oldest span is dropped and counted in ``spans_dropped``. A task
    on the event loop POSTs ``encode(batch)`` every ``flush_interval``
    seconds, and at once whenever ``max_batch`` spans are waiting, one
    request at a time with a ``timeout``: a collector that hangs holds back
    only the export. A report that fails (an error status, no answer within
    the timeout, a refused connection) costs ``reports_failed``, its spans
    count in ``spans_dropped``, and a warning is logged at most once per 30
    seconds. Stats live under ``tracing.<name>.``.
    """

    def __init__(
        self,
        name: str,
        collector: str,
        encode: Callable[[list[Span]], bytes],
        ctx: "BuildContext",
        *,
        flush_interval: float = 1.0,
        max_batch: int = 100,
        max_pending: int = 10000,
        timeout: float = 5.0,
        content_type: str = "application/json",
    ) -> None:
        parse_http_url(collector)
        if flush_interval <= 0 or timeout <= 0:
            raise ValueError(f"{name}: flush_interval and timeout must be more than 0s")
        if max_batch < 1 or max_pending < 1:
            raise ValueError(f"{name}: max_batch and max_pending_spans must be at least 1")
        self.name = name
        self.collector = collector
        self.encode = encode
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.timeout = timeout
        self.headers = {"content-type": content_type}
        self.stats = ExporterStats(ctx.stats.scope(f"tracing.{name}"))
        self._log = RateLimitedLog(ctx.logger)
        # A deque with a maxlen drops its oldest item on append when full.
        self._pending: deque[Span] = deque(maxlen=max_pending)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    @classmethod
    def from_config(
        cls, name: str, config: Mapping[str, Any], ctx: "BuildContext",
        encode: Callable[[list[Span]], bytes], content_type: str = "application/json",
    ) -> "BatchExporter":
        """An exporter from the keys every built-in tracer's config shares:
        ``collector`` (required), ``flush_interval`` (1s), ``max_batch``
        (100), ``max_pending_spans`` (10000) and ``timeout`` (5s)."""
        return cls(
            name, config["collector"], encode, ctx,
            flush_interval=parse_duration(config.get("flush_interval", "1s")),
            max_batch=int(config.get("max_batch", 100)),
            max_pending=int(config.get("max_pending_spans", 10000)),
            timeout=parse_duration(config.get("timeout", "5s")),
            content_type=content_type,
        )

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, span: Span) -> None:
        """Queue a finished span (the request path: O(1), never waits)."""
        pending = self._pending
        if len(pending) == self.max_pending:
            self.stats.spans_dropped.value += 1
        pending.append(span)
        wake = self._wake
        if wake is not None and len(pending) >= self.max_batch and not wake.is_set():
            wake.set()

    def start(self) -> None:
        """Start the export task (on the running event loop)."""
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))  # one report at a time
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self, deadline: float | None = None) -> None:
        """Send every pending span, ``max_batch`` at a time; with a
        ``deadline`` (a loop time), only until then."""
        loop = asyncio.get_running_loop()
        pending = self._pending
        while pending:
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - loop.time())
                if timeout <= 0:
                    return
            elif self._stopping:
                return
            batch = [pending.popleft() for _ in range(min(len(pending), self.max_batch))]
            await self._send(batch, timeout)

    async def _send(self, batch: list[Span], timeout: float) -> None:
        stats = self.stats
        try:
            body = self.encode(batch)
            assert self._session is not None
            async with self._session.post(
                self.collector, data=body, headers=self.headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                await response.read()
                if not 200 <= response.status < 300:
                    raise CollectorRejected(f"answered {response.status} {response.reason or ''}".rstrip())
        except asyncio.CancelledError:
            stats.spans_dropped.value += len(batch)
            raise
        except Exception as exc:
            stats.reports_failed.value += 1
            stats.spans_dropped.value += len(batch)
            self._log(
                logging.WARNING, "%s: sending %d spans to %s failed: %s",
                self.name, len(batch), self.collector, _describe(exc, timeout),
            )
            return
        stats.reports_sent.value += 1
        stats.spans_sent.value += len(batch)

    async def stop(self, timeout: float = 1.0) -> None:
        """Stop the task, send what is pending for at most ``timeout``
        seconds (a dead collector must not hold up a shutdown), close."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a cancellation that lands as a request times out can
            # be taken for that timeout; the task then ends at _stopping.
            await asyncio.wait({task}, timeout=self.timeout)
        session = self._session
        if session is None:
            return
        try:
            await self.flush(asyncio.get_running_loop().time() + min(timeout, self.timeout))
        finally:
            self._session = None
            self.stats.spans_dropped.value += len(self._pending)
            self._pending.clear()
            await session.close()


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {timeout:g}s"
    return str(exc) or repr(exc)
