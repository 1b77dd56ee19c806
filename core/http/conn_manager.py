"""The HTTP connection manager: per-request streams and the filter chain.

A codec (an extension: HTTP/1.1, HTTP/2) owns the socket and the wire format;
for each request it creates an :class:`ActiveStream` here and feeds it
decoded events. The stream runs them through the listener's HTTP filters
(built once at config time), and the filters' answer flows back through the
codec's ``encode_*`` methods. Nothing here touches bytes or sockets.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from ..access_log import LogInfoDefaults
from ..stats import StatsGroup
from ..timeouts import Timeout, TimeoutQueue
from .filter import STOP, HttpFilter, HttpFilterFactory, overrides
from .message import Headers, RequestHead, ResponseHead
from .routing import Route, RouteTable

if TYPE_CHECKING:  # pragma: no cover
    from ..context import BuildContext

log = logging.getLogger("outrider.http")

_HEADERS, _BODY, _TRAILERS = 0, 1, 2
_REQUEST_METHODS = ("on_request_headers", "on_request_body", "on_request_trailers")
_RESPONSE_METHODS = ("on_response_headers", "on_response_body", "on_response_trailers")


class HttpStats(StatsGroup):
    """``http.<stat_prefix>.*``"""

    COUNTERS = (
        "downstream_rq_total",
        "downstream_rq_1xx",
        "downstream_rq_2xx",
        "downstream_rq_3xx",
        "downstream_rq_4xx",
        "downstream_rq_5xx",
        "downstream_rq_completed",
        "downstream_rq_rx_reset",
        "downstream_rq_tx_reset",
        "downstream_rq_timeout",
        "downstream_rq_header_timeout",
        "downstream_rq_too_large",
        "downstream_rq_http1_total",
        "downstream_cx_total",
        "downstream_cx_destroy",
        "downstream_cx_protocol_error",
        "downstream_cx_idle_timeout",
        "downstream_cx_rx_bytes_total",
        "downstream_cx_tx_bytes_total",
        "no_route",
        "filter_error",
        "local_reply",
        "rq_direct_response",
        "rq_redirect",
    )
    GAUGES = ("downstream_cx_active", "downstream_rq_active")
    HISTOGRAMS = ("downstream_rq_time",)

    def __init__(self, scope: Any) -> None:
        super().__init__(scope)
        self.by_class = [
            self.downstream_rq_1xx,
            self.downstream_rq_1xx,
            self.downstream_rq_2xx,
            self.downstream_rq_3xx,
            self.downstream_rq_4xx,
            self.downstream_rq_5xx,
        ]
        self._protocol_errors: dict[str, Any] = {}

    def protocol_error(self, reason: str) -> None:
        """Count a malformed request under its precise reason as well."""
        self.downstream_cx_protocol_error.value += 1
        counter = self._protocol_errors.get(reason)
        if counter is None:
            counter = self._protocol_errors[reason] = self.scope.counter(f"protocol_error.{reason}")
        counter.value += 1


# Request ids need to be unique, not secret: a PRNG seeded from the OS costs
# no system call per request (os.urandom does one).
_id_bits = random.Random(os.urandom(32)).getrandbits


# The version (4) and variant (RFC 4122) bits of a random UUID, set with one
# mask and one or on the 128 random bits.
_UUID4_KEEP = ((1 << 128) - 1) & ~((0xF << 76) | (0x3 << 62))
_UUID4_SET = (0x4 << 76) | (0x2 << 62)


def new_request_id() -> str:
    """A random (version 4) UUID string, cheaper than ``str(uuid.uuid4())``."""
    h = (_id_bits(128) & _UUID4_KEEP | _UUID4_SET).to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class HttpConnectionManager:
    """Everything one listener's ``http:`` block compiles to.

    Built once per config load; every connection and stream of the listener
    shares it.
    """

    def __init__(
        self, config: dict[str, Any], ctx: "BuildContext", listener_name: str = "", buffer_limit: int = 1024 * 1024
    ) -> None:
        self.config = config
        self.listener_name = listener_name
        self.stat_prefix = config["stat_prefix"]
        self.stats = HttpStats(ctx.stats.scope(f"http.{self.stat_prefix}"))
        self.route_table = RouteTable(config.get("virtual_hosts", ()))
        self.cluster_manager = ctx.cluster_manager
        self.server_name = config.get("server_name", "outrider")
        self.generate_request_id = config.get("generate_request_id", True)
        self.use_remote_address = config.get("use_remote_address", False)
        self.xff_num_trusted_hops = config.get("xff_num_trusted_hops", 0)
        self.request_headers_timeout = config.get("request_headers_timeout", 10.0)
        self.idle_timeout = config.get("idle_timeout", 300.0)
        self.request_timeout = config.get("request_timeout")
        #: Deadlines for receiving a whole request (``request_timeout``).
        self.request_timeouts = TimeoutQueue(self.request_timeout) if self.request_timeout else None
        self.max_request_headers_bytes = int(config.get("max_request_headers_kb", 60)) * 1024
        self.max_headers_count = int(config.get("max_headers_count", 100))
        #: The listener's per_connection_buffer_limit: request bytes held
        #: (while a filter stops or the upstream connects) before reading pauses.
        self.buffer_limit = buffer_limit
        self.draining = False

        self.filter_factories: list[HttpFilterFactory] = []
        refs = config.get("filters") or [{"name": "router", "config": {}}]
        for ref in refs:
            factory = ctx.build("filters.http", ref)
            if not hasattr(factory, "filter_class"):
                raise TypeError(
                    f"filters.http extension {ref['name']!r}: its factory must return an "
                    f"outrider.HttpFilterFactory (got {type(factory).__name__})"
                )
            factory.extension_name = ref["name"]
            self.filter_factories.append(factory)
        if not self.filter_factories[-1].filter_class.terminal:
            raise ValueError(
                f"listener {listener_name!r}: the last HTTP filter must be a terminal one such as "
                f"'router' (it is {refs[-1]['name']!r})"
            )
        for ref, factory in zip(refs[:-1], self.filter_factories[:-1]):
            if factory.filter_class.terminal:
                raise ValueError(f"listener {listener_name!r}: the terminal filter {ref['name']!r} must come last")
        # Which filters take part in each phase, decided once: a filter that
        # leaves a method alone costs nothing per request for that method.
        classes = [f.filter_class for f in self.filter_factories]
        self.request_phases = [
            [i for i, cls in enumerate(classes) if overrides(cls, m)] for m in _REQUEST_METHODS
        ]
        self.response_phases = [
            [i for i, cls in reversed(list(enumerate(classes))) if overrides(cls, m)]
            for m in _RESPONSE_METHODS
        ]
        self.destroy_hooks = [i for i, cls in enumerate(classes) if overrides(cls, "on_destroy")]
        #: ``(filter_class, config)`` per filter when every factory is a plain
        #: HttpFilterFactory: a stream then builds its filters without a call
        #: to the factory (this runs per request). ``None``: call the factories.
        self.filter_specs: tuple[tuple[type[HttpFilter], Any], ...] | None = None
        if all(type(f).__call__ is HttpFilterFactory.__call__ for f in self.filter_factories):
            self.filter_specs = tuple((f.filter_class, f.config) for f in self.filter_factories)
        # The terminal filter ends the chain: its STOP holds nothing back.
        self.terminal_index = len(classes) - 1
        self.stream_observers: list[Callable[["ActiveStream"], None]] = []
        #: Called with a :class:`RejectedRequest` for each request the codec
        #: refused before it became a stream (the access logs).
        self.rejected_request_observers: list[Callable[["RejectedRequest"], None]] = []
        # -- tracing (core/tracing.py) --
        #: The server's ``tracing:``, or ``None``: then tracing costs one
        #: test per request (in decode_headers).
        self.tracing = ctx.tracing
        if self.tracing is not None:
            self.stream_observers.append(self.tracing.finish_server_span)
        # -- end tracing --
        #: The ``debug:`` block, compiled; ``None`` (the default) costs nothing
        #: per request. With one, new_stream looks for the debug header.
        self.debug: Any = None
        if config.get("debug"):
            from .debug import DebugPolicy

            self.debug = DebugPolicy(config["debug"], self)
            self.new_stream = self.debug.new_stream  # type: ignore[method-assign]

    def request_rejected(self, connection: Any, status: int, details: str, bytes_sent: int) -> None:
        """The codec answered ``status`` to a request head it could not
        accept and is closing the connection: log it like a finished stream."""
        if self.rejected_request_observers:
            record = RejectedRequest(connection, status, details, bytes_sent)
            for observer in self.rejected_request_observers:
                observer(record)

    def new_stream(self, connection: Any, request: RequestHead) -> "ActiveStream":
        return ActiveStream(self, connection, request)


class RejectedRequest(LogInfoDefaults):
    """A request the codec refused before it became a stream (a malformed or
    oversized head), as the access logs see it: no request or route, the
    codec's error response, and Envoy's flag ``DPE`` (downstream protocol
    error)."""

    response_flags = ("DPE",)
    connection: Any = None  # the codec's connection, not the record itself

    def __init__(self, connection: Any, status: int, details: str, bytes_sent: int) -> None:
        self.connection = connection
        self.response = ResponseHead(status, Headers())
        self.response_code_details = details
        self.bytes_sent = bytes_sent
        self.start_time = self.request_end_time = time.monotonic()


class ActiveStream:
    """One request and its response, as it passes through the filter chain."""

    # Per-request state starts as these class-level defaults: a stream sets
    # only what its request changes (most requests change little of it).
    response: ResponseHead | None = None
    route: Route | None = None
    request_id = ""
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    #: Envoy response flags (``UH``, ``UF``, ``NR``...), in the order set.
    response_flags: tuple[str, ...] = ()
    response_code_details = ""
    bytes_received = 0
    bytes_sent = 0
    #: Access log timings (``time.monotonic()``; 0.0: not yet / never): the
    #: last request byte, and the upstream response head (set by the router).
    request_end_time = 0.0
    upstream_first_byte_time = 0.0
    response_trailers: Headers | None = None
    #: Set by a filter that recognised a health check (access log filters).
    is_health_check = False
    request_complete = False
    response_started = False
    response_complete = False
    destroyed = False
    _req_stopped: tuple[int, int, Any, bool] | None = None
    _req_pending: deque | None = None
    _req_pending_bytes = 0
    _resp_stopped: tuple[int, int, Any, bool] | None = None
    _resp_pending: deque | None = None
    _current = 0
    _reading_paused = False
    _watermark_listeners: tuple[Any, ...] = ()
    #: The client reads slower than the response is produced (the codec said
    #: so); a listener added meanwhile is told at once.
    downstream_write_paused = False
    _request_timer: Timeout | None = None
    _state: dict[str, Any] | None = None
    #: A ``DebugInfo`` when this request asked for the debug header and may
    #: have it (see core/http/debug.py); the terminal filter records its
    #: upstream timings there.
    debug: Any = None
    #: With tracing on, this request's server span (a ``Span``, or a
    #: ``NonRecordingSpan`` when not sampled; see core/tracing.py). The
    #: router starts a client span per attempt from it.
    span: Any = None

    def __init__(self, hcm: HttpConnectionManager, connection: Any, request: RequestHead) -> None:
        self.hcm = hcm
        self.connection = connection
        self.request = request
        self.start_time = time.monotonic()
        specs = hcm.filter_specs
        if specs is None:
            self.filters: list[HttpFilter] = [factory(self) for factory in hcm.filter_factories]
        else:
            # What HttpFilterFactory.__call__ does, without the call per filter.
            filters = self.filters = []
            for filter_class, config in specs:
                filters.append(filter_class(self, config))

    @property
    def client_ip(self) -> str:
        """The client's address as Envoy infers it from ``x-forwarded-for``:
        the (``xff_num_trusted_hops`` + 1)th address from the right, counted
        after this proxy appended its peer (``use_remote_address``). ``""``
        when the header has too few addresses or not an IP there, or when
        that address is the peer itself: the connection's peer is the client.
        Read by access logs (``%DOWNSTREAM_REMOTE_ADDRESS%``), when asked."""
        request = self.request
        hops = request.headers.get_all("x-forwarded-for") if request is not None else None
        if not hops:
            return ""
        hcm = self.hcm
        nth = hcm.xff_num_trusted_hops + 1
        if nth == 1 and hcm.use_remote_address:
            return ""  # the last entry is the peer this proxy appended
        entries = ",".join(hops).split(",")
        if len(entries) < nth:
            return ""
        candidate = entries[-nth].strip()
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return ""
        return candidate

    @property
    def state(self) -> dict[str, Any]:
        """Free-form per-request data filters may share (e.g. timings)."""
        state = self._state
        if state is None:
            state = self._state = {}
        return state

    def add_response_flag(self, flag: str) -> None:
        if flag not in self.response_flags:
            self.response_flags += (flag,)

    # -- decoding (downstream → filters) -----------------------------------

    def decode_headers(self, end_stream: bool) -> None:
        """The codec parsed the request head."""
        hcm = self.hcm
        stats = hcm.stats
        stats.downstream_rq_total.value += 1
        stats.downstream_rq_active.value += 1
        request = self.request
        headers = request.headers
        if hcm.generate_request_id:
            rid = headers.get("x-request-id")
            if rid is None:
                rid = new_request_id()
                headers.append(("x-request-id", rid))
            self.request_id = rid
        if hcm.use_remote_address:
            remote = self.connection.remote_ip
            hops = headers.get_all("x-forwarded-for")
            if not hops:
                headers.append(("x-forwarded-for", remote))
            else:
                # Repeated lines are one list (RFC 9110 5.3): keep every hop.
                headers.set("x-forwarded-for", f"{', '.join(hops)}, {remote}")
            headers.set("x-forwarded-proto", request.scheme)
        elif not headers.has("x-forwarded-proto"):
            headers.append(("x-forwarded-proto", request.scheme))
        if request.expect_continue:
            headers.remove_all("expect")
        self.route = hcm.route_table.route(request)
        if hcm.tracing is not None:  # tracing: after the request id and route, before any filter
            self.span = hcm.tracing.start_server_span(self)
        if end_stream:
            self.request_complete = True
            self.request_end_time = self.start_time
        elif hcm.request_timeouts is not None:
            self._request_timer = hcm.request_timeouts.add(self._on_request_timeout)
        self._decode(_HEADERS, 0, request, end_stream)
        if request.expect_continue and not self.response_started and not self.request_complete:
            self.connection.send_continue(self)

    def decode_body(self, chunk: bytes, end_stream: bool) -> None:
        """A chunk of the request body (framing already removed)."""
        self.bytes_received += len(chunk)
        if end_stream:
            self.request_complete = True
            self.request_end_time = time.monotonic()
            self._cancel_request_timer()
        if self._req_stopped is not None:
            self._queue_request(_BODY, chunk, end_stream)
            return
        self._decode(_BODY, 0, chunk, end_stream)

    def decode_trailers(self, trailers: Headers) -> None:
        self.request_complete = True
        self.request_end_time = time.monotonic()
        self._cancel_request_timer()
        if self._req_stopped is not None:
            self._queue_request(_TRAILERS, trailers, True)
            return
        self._decode(_TRAILERS, 0, trailers, True)

    def _queue_request(self, kind: int, payload: Any, end_stream: bool) -> None:
        if self._req_pending is None:
            self._req_pending = deque()
        self._req_pending.append((kind, payload, end_stream))
        if kind == _BODY:
            self._req_pending_bytes += len(payload)
            if self._req_pending_bytes > self.hcm.buffer_limit and not self._reading_paused:
                self.pause_downstream_reading()

    def _decode(self, kind: int, start: int, payload: Any, end_stream: bool) -> None:
        if self.response_complete or self.destroyed:
            return
        filters = self.filters
        method = _REQUEST_METHODS[kind]
        terminal = self.hcm.terminal_index
        index = -1
        try:
            for index in self.hcm.request_phases[kind]:
                if index < start:
                    continue
                self._current = index
                f = filters[index]
                if kind == _HEADERS:
                    result = f.on_request_headers(payload, end_stream)
                elif kind == _BODY:
                    result = f.on_request_body(payload, end_stream)
                    if result is not None and result is not STOP:
                        payload = result
                        continue
                else:
                    result = f.on_request_trailers(payload)
                if result is STOP and index != terminal:
                    self._req_stopped = (index, kind, payload, end_stream)
                    return
                if self.response_complete or self.destroyed:
                    return
        except Exception as exc:  # a filter's bug fails this request only
            self._filter_failed(index, method, exc)

    def resume_request(self) -> None:
        """Continue the request chain after a filter returned STOP."""
        stopped = self._req_stopped
        if stopped is None:
            return
        self._req_stopped = None
        index, kind, payload, end_stream = stopped
        self._decode(kind, index + 1, payload, end_stream)
        pending = self._req_pending
        while pending and self._req_stopped is None:
            kind, payload, end_stream = pending.popleft()
            if kind == _BODY:
                self._req_pending_bytes -= len(payload)
            self._decode(kind, 0, payload, end_stream)
        if self._reading_paused and self._req_pending_bytes <= self.hcm.buffer_limit:
            self.resume_downstream_reading()

    # -- encoding (filters → downstream) -----------------------------------

    def encode_headers(self, response: ResponseHead, end_stream: bool, from_filter: int | None = None) -> None:
        """Send the response head down the chain (called by the terminal
        filter, usually the router, or by ``send_local_reply``)."""
        if self.response_started or self.destroyed:
            return
        self.response = response
        if not self.hcm.response_phases[_HEADERS]:  # no filter reads response heads: straight to the codec
            self._write(_HEADERS, response, end_stream)
            return
        self._encode(_HEADERS, self._encode_start(from_filter), response, end_stream)

    def encode_body(self, chunk: bytes, end_stream: bool, from_filter: int | None = None) -> None:
        if self._resp_stopped is not None:
            self._resp_pending.append((_BODY, chunk, end_stream))  # type: ignore[union-attr]
            return
        if not self.hcm.response_phases[_BODY]:  # as in encode_headers
            if not self.destroyed:
                self._write(_BODY, chunk, end_stream)
            return
        self._encode(_BODY, self._encode_start(from_filter), chunk, end_stream)

    def encode_trailers(self, trailers: Headers, from_filter: int | None = None) -> None:
        if self._resp_stopped is not None:
            self._resp_pending.append((_TRAILERS, trailers, True))  # type: ignore[union-attr]
            return
        self._encode(_TRAILERS, self._encode_start(from_filter), trailers, True)

    def _encode_start(self, from_filter: int | None) -> int:
        # Response events start at the filter before the one answering.
        return (len(self.filters) if from_filter is None else from_filter) - 1

    def _encode(self, kind: int, start: int, payload: Any, end_stream: bool) -> None:
        if self.destroyed:
            return
        filters = self.filters
        index = -1
        try:
            for index in self.hcm.response_phases[kind]:
                if index > start:
                    continue
                self._current = index  # a local reply from here starts below this filter
                f = filters[index]
                if kind == _HEADERS:
                    result = f.on_response_headers(payload, end_stream)
                elif kind == _BODY:
                    result = f.on_response_body(payload, end_stream)
                    if result is not None and result is not STOP:
                        payload = result
                        continue
                else:
                    result = f.on_response_trailers(payload)
                if result is STOP:
                    self._resp_stopped = (index, kind, payload, end_stream)
                    if self._resp_pending is None:
                        self._resp_pending = deque()
                    return
                if self.destroyed:
                    return
        except Exception as exc:
            self._filter_failed(index, _RESPONSE_METHODS[kind], exc)
            return
        self._write(kind, payload, end_stream)

    def resume_response(self) -> None:
        """Continue the response chain after a filter returned STOP."""
        stopped = self._resp_stopped
        if stopped is None:
            return
        self._resp_stopped = None
        index, kind, payload, end_stream = stopped
        self._encode(kind, index - 1, payload, end_stream)
        pending = self._resp_pending
        while pending and self._resp_stopped is None:
            kind, payload, end_stream = pending.popleft()
            self._encode(kind, len(self.filters) - 1, payload, end_stream)

    def _write(self, kind: int, payload: Any, end_stream: bool) -> None:
        connection = self.connection
        if kind == _HEADERS:
            self.response_started = True
            payload.headers.set("server", self.hcm.server_name)
            if self.hcm.generate_request_id and self.request_id and not payload.headers.has("x-request-id"):
                # Envoy echoes the id only when asked; we always do: it is the
                # handle a user quotes when asking "what happened to my request".
                payload.headers.append(("x-request-id", self.request_id))
            connection.encode_headers(self, payload, end_stream)
        elif kind == _BODY:
            self.bytes_sent += len(payload)
            connection.encode_body(self, payload, end_stream)
        else:
            self.response_trailers = payload
            connection.encode_trailers(self, payload)
            end_stream = True
        if end_stream:
            self._complete()

    # -- local replies and failures ----------------------------------------

    def send_local_reply(
        self,
        status: int,
        body: bytes | str = b"",
        headers: list[tuple[str, str]] | None = None,
        details: str = "",
        flag: str | None = None,
        content_type: str = "text/plain",
    ) -> None:
        """Answer the request from the proxy itself (404, 429, 503, ...).

        ``details`` is a short snake_case reason (Envoy's response code
        details); ``flag`` an Envoy response flag such as ``NR`` or ``UH``.
        When the response has already started, the stream is reset instead.
        """
        if flag:
            self.add_response_flag(flag)
        if details:
            self.response_code_details = details
        if self.response_started:
            self.reset(details or "local_reply_after_response_started")
            return
        self.hcm.stats.local_reply.value += 1
        if isinstance(body, str):
            body = body.encode("utf-8")
        head_headers = Headers(headers or ())
        if body and not head_headers.has("content-type"):
            head_headers.append(("content-type", content_type))
        head_headers.set("content-length", str(len(body)))
        response = ResponseHead(status, head_headers, content_length=len(body))
        from_filter = self._current if self._current < len(self.filters) else None
        self._req_stopped = None
        # It replaces a response a filter may be holding (STOP): what was
        # held, or queued behind it, is dropped.
        self._resp_stopped = self._resp_pending = None
        self.encode_headers(response, not body, from_filter=from_filter)
        if body and not self.destroyed:
            self.encode_body(body, True, from_filter=from_filter)

    def _filter_failed(self, index: int, method: str, exc: BaseException) -> None:
        name = self.hcm.filter_factories[index].extension_name if 0 <= index < len(self.filters) else "?"
        self.hcm.stats.filter_error.value += 1
        log.error(
            "filter %r raised in %s (request %s %s, id %s): %r",
            name, method, self.request.method, self.request.path, self.request_id or "-", exc,
            exc_info=exc,
        )
        # The 500 is answered as if by the failed filter: it travels down from
        # the filter before it, so neither the failed filter nor any filter
        # above it sees it (re-entering the failed one could fail again, and
        # again). In the response phase those filters had already passed
        # the response that is now replaced.
        self._current = index if 0 <= index < len(self.filters) else len(self.filters)
        self.send_local_reply(500, "internal error in filter\n", details=f"filter_error.{name}")

    # -- flow control -------------------------------------------------------

    def pause_downstream_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.connection.pause_reading()

    def resume_downstream_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.connection.resume_reading()

    def add_watermark_listener(self, listener: Any) -> None:
        """``listener.on_downstream_write_paused()`` / ``_resumed()`` are called
        when the client reads slower than the response is produced (at once
        when it already does)."""
        self._watermark_listeners += (listener,)
        if self.downstream_write_paused:
            listener.on_downstream_write_paused()

    def remove_watermark_listener(self, listener: Any) -> None:
        self._watermark_listeners = tuple(x for x in self._watermark_listeners if x is not listener)

    def on_downstream_write_paused(self) -> None:
        self.downstream_write_paused = True
        for listener in self._watermark_listeners:
            listener.on_downstream_write_paused()

    def on_downstream_write_resumed(self) -> None:
        self.downstream_write_paused = False
        for listener in self._watermark_listeners:
            listener.on_downstream_write_resumed()

    # -- end of life --------------------------------------------------------

    def reset(self, reason: str) -> None:
        """Abort the stream: the codec resets it (HTTP/1.1 closes the connection)."""
        if self.destroyed:
            return
        self.hcm.stats.downstream_rq_tx_reset.value += 1
        if not self.response_code_details:
            self.response_code_details = reason
        self.connection.reset_stream(self, reason)
        self._destroy()

    def on_downstream_reset(self, reason: str) -> None:
        """The client went away (or the codec gave up on it) mid-stream."""
        if self.destroyed:
            return
        if not self.response_complete:
            self.hcm.stats.downstream_rq_rx_reset.value += 1
            self.add_response_flag("DC")
            if not self.response_code_details:
                self.response_code_details = reason
        self._destroy()

    def _complete(self) -> None:
        self.response_complete = True
        stats = self.hcm.stats
        stats.downstream_rq_completed.value += 1
        stats.downstream_rq_time.record((time.monotonic() - self.start_time) * 1000.0)
        response = self.response
        if response is not None:
            status = response.status
            if 100 <= status < 600:
                stats.by_class[status // 100].value += 1
        self._destroy()

    def _cancel_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _on_request_timeout(self) -> None:
        self._request_timer = None
        if self.destroyed or self.request_complete:
            return
        self.hcm.stats.downstream_rq_timeout.value += 1
        log.info("request %s %s (id %s): not received within request_timeout %.3gs",
                 self.request.method, self.request.path, self.request_id or "-", self.hcm.request_timeout)
        # A reply mid-request closes the connection: the rest will not be read.
        self.send_local_reply(408, "request timeout\n", details="request_overall_timeout")

    def _destroy(self) -> None:
        if self.destroyed:
            return
        self.destroyed = True
        if self._request_timer is not None:
            self._cancel_request_timer()
        self.hcm.stats.downstream_rq_active.value -= 1
        filters = self.filters
        for index in self.hcm.destroy_hooks:
            try:
                filters[index].on_destroy()
            except Exception as exc:
                log.error("filter %r raised in on_destroy: %r", self.hcm.filter_factories[index].extension_name, exc)
        for observer in self.hcm.stream_observers:
            observer(self)
        # The filters refer to the stream (filter.stream) and the stream to
        # them: drop the stream's side, so that reference counting frees a
        # finished request at once instead of leaving every request's objects
        # to the cyclic garbage collector (which showed in profiles).
        self.filters = []
        self._watermark_listeners = ()
        if self._reading_paused:
            self._reading_paused = False
            self.connection.resume_reading()
        self.connection.stream_done(self)

    @property
    def duration(self) -> float:
        return time.monotonic() - self.start_time
