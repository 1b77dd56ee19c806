"""The router: the terminal HTTP filter that answers from the route table.

Direct responses and redirects are answered here; ``route`` actions pick a
cluster and a host, take a connection from the pool and stream the request
up and the response down, with a timeout, retries and flow control both ways.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from outrider import BuildContext, Extension, HttpFilter, HttpFilterFactory, STOP, hookimpl
from outrider.http.message import Headers, RequestHead, ResponseHead
from outrider.timeouts import Timeout

log = logging.getLogger("outrider.router")

# Bodies up to this size are kept so the request can be retried.
RETRY_BUFFER_LIMIT = 64 * 1024
_RETRIABLE_5XX = frozenset(range(500, 600))
_GATEWAY_ERRORS = frozenset((502, 503, 504))


class RouterConfig:
    __slots__ = ("cluster_manager", "suppress_envoy_headers")

    def __init__(self, config: dict[str, Any], ctx: BuildContext) -> None:
        self.cluster_manager = ctx.cluster_manager
        self.suppress_envoy_headers = bool(config.get("suppress_envoy_headers", False))


class RetryState:
    """What a route's retry policy allows for one request."""

    __slots__ = ("on", "remaining", "statuses")

    def __init__(self, policy: dict[str, Any]) -> None:
        self.on = frozenset(policy.get("retry_on", ()))
        self.remaining = int(policy.get("num_retries", 1))
        self.statuses = frozenset(policy.get("retriable_status_codes", ()))

    def retry_status(self, status: int) -> bool:
        on = self.on
        return (
            ("5xx" in on and status in _RETRIABLE_5XX)
            or ("gateway-error" in on and status in _GATEWAY_ERRORS)
            or ("retriable-4xx" in on and status == 409)
            or ("retriable-status-codes" in on and status in self.statuses)
        )

    def retry_reset(self, reason: str) -> bool:
        on = self.on
        if reason == "overflow":  # the pool's own limit: another try would only queue again (as Envoy)
            return False
        if reason in ("connect_failure", "connect_timeout"):
            return "connect-failure" in on or "5xx" in on or "gateway-error" in on
        return "reset" in on or "5xx" in on or "gateway-error" in on


class Router(HttpFilter):
    """One request's trip upstream."""

    terminal = True

    # Per-request state starts as class-level defaults: the base __init__
    # sets only stream and config, the rest is set as the request needs it.
    config: RouterConfig
    cluster: Any = None
    route: Any = None
    request: RequestHead | None = None
    upstream: "UpstreamRequest | None" = None
    request_ended = False
    body: list[bytes] | None = None  # held until connected, and for retries
    body_size = 0
    trailers: Headers | None = None
    retry: RetryState | None = None
    attempts = 0
    timer: Timeout | None = None
    try_timer: Timeout | None = None  # the current attempt's per_try_timeout
    retries_held = 0  # this request's share of the cluster's max_retries
    retry_limit_exceeded = False  # a retriable outcome with no retry left (URX)
    done = False
    upstream_class: type["UpstreamRequest"]  # UpstreamRequest (set below), or DebugUpstreamRequest
    debug_upstream_class: type["UpstreamRequest"]  # DebugUpstreamRequest (set below); tracing.py has its own

    # -- request path -------------------------------------------------------

    def on_request_headers(self, request: RequestHead, end_stream: bool) -> Any:
        stream = self.stream
        route = stream.route
        self.request_ended = end_stream
        if route is None:
            stream.hcm.stats.no_route.value += 1
            stream.send_local_reply(404, "", details="route_not_found", flag="NR")
            return STOP
        self.route = route
        if route.direct_response is not None:
            status, body, headers = route.direct_response
            stream.hcm.stats.rq_direct_response.value += 1
            head = Headers(headers)
            head.set("content-length", str(len(body)))
            response = ResponseHead(status, head, content_length=len(body))
            self._finalize_response(response)
            stream.response_code_details = "direct_response"
            stream.encode_headers(response, not body)
            if body:
                stream.encode_body(body, True)
            return STOP
        if route.redirect is not None:
            stream.hcm.stats.rq_redirect.value += 1
            location = route.redirect.location(request, route)
            stream.send_local_reply(route.redirect.status, "", headers=[("location", location)], details="redirect")
            return STOP
        cluster_name = route.cluster
        if cluster_name is None:  # weighted_clusters
            cluster_name = route.pick_cluster()
        cluster = self.config.cluster_manager.get(cluster_name)
        if cluster is None:
            stream.send_local_reply(503, "no such cluster\n", details="cluster_not_found", flag="NC")
            return STOP
        self.cluster = cluster
        stream.upstream_cluster = cluster_name
        for ops in route.request_header_chain:
            ops.apply(request.headers)
        if route.prefix_rewrite is not None:
            new_path = route.rewrite_path(request.path)
            if new_path != request.path:
                request.headers.append(("x-envoy-original-path", request.path))
                request.path = new_path
        if route.host_rewrite:
            request.authority = route.host_rewrite
        self.request = request
        if route.retry_policy:
            self.retry = RetryState(route.retry_policy)
        if not end_stream:
            self.body = []
        if route.timeouts is not None:
            self.timer = route.timeouts.add(self._on_timeout)
        stream.add_watermark_listener(self)
        if stream.debug is not None:  # the debug header: time this request's attempts
            self.upstream_class = self.debug_upstream_class
        self._attempt()
        return STOP

    def on_request_body(self, chunk: bytes, end_stream: bool) -> Any:
        if end_stream:
            self.request_ended = True
        upstream = self.upstream
        keep = self.body is not None and (self.retry is not None or upstream is None or upstream.connection is None)
        if keep:
            self.body.append(chunk)  # type: ignore[union-attr]
            self.body_size += len(chunk)
            if self.body_size > RETRY_BUFFER_LIMIT and self.retry is not None:
                self.retry = None  # too big to replay
                if upstream is not None and upstream.connection is not None:
                    self.body = None
        if upstream is not None and upstream.connection is not None:
            upstream.connection.send_body(chunk, end_stream)
        elif self.body_size > self.stream.hcm.buffer_limit:
            # Still connecting and the client keeps sending: stop reading it.
            self.stream.pause_downstream_reading()
        return STOP

    def on_request_trailers(self, trailers: Headers) -> Any:
        self.request_ended = True
        self.trailers = trailers
        upstream = self.upstream
        if upstream is not None and upstream.connection is not None:
            upstream.connection.send_trailers(trailers)
        return STOP

    # -- upstream attempts ----------------------------------------------------

    def _attempt(self) -> None:
        cluster = self.cluster
        stats = cluster.stats
        if stats.upstream_rq_active.value >= cluster.max_requests:
            stats.upstream_rq_pending_overflow.value += 1
            self._fail(503, "upstream overflow\n", "upstream_max_requests_overflow", "UO")
            return
        host = cluster.lb.choose(self.request)  # cluster.choose_host(), inlined
        if host is None:
            stats.upstream_cx_none_healthy.value += 1
            self._fail(503, "no healthy upstream\n", "no_healthy_upstream", "UH")
            return
        self.attempts += 1
        self.stream.upstream_host = host.address
        per_try = self.route.per_try_timeouts  # type: ignore[union-attr]
        if per_try is not None:
            self.try_timer = per_try.add(self._on_per_try_timeout)
        self.upstream = self.upstream_class(self, cluster, host)
        self.upstream.start()

    def _on_per_try_timeout(self) -> None:
        self.try_timer = None
        if self.done:
            return
        self.cluster.stats.upstream_rq_per_try_timeout.value += 1
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abandon("per_try_timeout")
        if self._retry_allowed("per_try_timeout"):
            self._attempt()
            return
        self._fail(504, "upstream request timeout\n", "upstream_per_try_timeout", "UT")

    def _send_request(self, upstream: "UpstreamRequest") -> None:
        """The pool gave ``upstream`` a connection: send what we have."""
        conn = upstream.connection
        if self.stream.downstream_write_paused:  # the client is behind: read the answer no faster
            conn.pause_reading()
        request = self.request
        body = self.body
        end_stream = self.request_ended and not body and self.trailers is None
        conn.start_request(upstream, _clone_head(request) if self.retry else request, end_stream)
        if body:
            last = len(body) - 1
            for i, chunk in enumerate(body):
                conn.send_body(chunk, self.request_ended and self.trailers is None and i == last)
            if self.retry is None:
                self.body = None
        if self.trailers is not None and self.request_ended:
            conn.send_trailers(self.trailers)
        self.stream.resume_downstream_reading()

    def on_upstream_failure(self, upstream: "UpstreamRequest", reason: str, detail: str, response_started: bool) -> None:
        if self.done or upstream is not self.upstream:
            return
        self.upstream = None
        self._cancel_try_timer()
        if response_started:
            # Too late for a local reply: the client sees the connection cut,
            # the access log sees why.
            self.stream.add_response_flag("UPE" if reason == "protocol_error" else "UC")
            self.stream.reset(f"upstream_reset_after_response_started{{{reason}}}")
            return
        if self._retry_allowed(reason):
            self._attempt()
            return
        if reason == "overflow":
            self._fail(503, "upstream overflow\n", "upstream_overflow", "UO")
        elif reason in ("connect_failure", "connect_timeout"):
            self._fail(503, "upstream connect error\n", f"upstream_connect_failure{{{detail}}}", "UF")
        elif reason == "protocol_error":
            self._fail(502, "upstream sent an invalid response\n", f"upstream_protocol_error{{{detail}}}", "UPE")
        else:
            self._fail(502, "upstream reset before response\n", f"upstream_reset_before_response_started{{{reason}}}", "UC")

    def _retry_allowed(self, reason: str) -> bool:
        retry = self.retry
        if retry is None or not retry.retry_reset(reason):
            return False
        if retry.remaining <= 0:
            self._note_retries_exhausted()
            return False
        if not self.request_ended and self.body is None:
            return False
        return self._use_retry()

    def _note_retries_exhausted(self) -> None:
        """The outcome was one the policy retries, but no retry is left:
        Envoy's URX flag (added after the failure's own, or to the
        upstream's answer) and ``upstream_rq_retry_limit_exceeded``."""
        self.cluster.stats.upstream_rq_retry_limit_exceeded.value += 1
        self.retry_limit_exceeded = True

    def _use_retry(self) -> bool:
        assert self.retry is not None
        cluster = self.cluster
        if cluster.active_retries >= cluster.max_retries:
            # The circuit breaker: retries in flight across the cluster.
            cluster.stats.upstream_rq_retry_overflow.value += 1
            self.stream.add_response_flag("UO")
            return False
        cluster.active_retries += 1
        self.retries_held += 1
        self.retry.remaining -= 1
        cluster.stats.upstream_rq_retry.value += 1
        self._cancel_try_timer()
        return True

    def _cancel_try_timer(self) -> None:
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    def _release_retries(self) -> None:
        if self.retries_held:
            self.cluster.active_retries -= self.retries_held
            self.retries_held = 0

    # -- response path --------------------------------------------------------

    def on_upstream_headers(self, upstream: "UpstreamRequest", head: ResponseHead, end_stream: bool) -> bool:
        """Returns False when the response is discarded for a retry."""
        if self.try_timer is not None:
            self._cancel_try_timer()
        retry = self.retry
        if (
            retry is not None
            and retry.remaining > 0
            and retry.retry_status(head.status)
            and (self.request_ended or self.body is not None)
            and self._use_retry()
        ):
            self.upstream = None
            upstream.abandon()
            self._attempt()
            return False
        if retry is not None and not retry.remaining and retry.retry_status(head.status):
            self._note_retries_exhausted()
            self.stream.add_response_flag("URX")  # the upstream's answer goes down as is
        if self.attempts > 1:
            self.cluster.stats.upstream_rq_retry_success.value += 1
        now = time.monotonic()
        self.stream.upstream_first_byte_time = now  # access logs' %RESPONSE_DURATION%
        if self.route.response_header_chain:
            self._finalize_response(head)
        if not self.config.suppress_envoy_headers:
            head.headers.append(("x-envoy-upstream-service-time", str(int((now - upstream.start_time) * 1000.0))))
        if end_stream:
            self._finished()
        self.stream.encode_headers(head, end_stream)
        return True

    def on_upstream_body(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self._finished()
        self.stream.encode_body(data, end_stream)

    def on_upstream_trailers(self, trailers: Headers) -> None:
        self._finished()
        self.stream.encode_trailers(trailers)

    def _finalize_response(self, head: ResponseHead) -> None:
        for ops in self.route.response_header_chain:
            ops.apply(head.headers)

    def _finished(self) -> None:
        # Before the last event goes downstream: finishing the response
        # destroys the stream, and on_destroy must see a finished upstream.
        self.done = True
        self.upstream = None
        # The helpers' own tests, inlined: this runs per request.
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        if self.try_timer is not None:
            self._cancel_try_timer()
        if self.retries_held:
            self._release_retries()

    # -- flow control ---------------------------------------------------------

    def on_downstream_write_paused(self) -> None:
        if self.upstream is not None and self.upstream.connection is not None:
            self.upstream.connection.pause_reading()

    def on_downstream_write_resumed(self) -> None:
        if self.upstream is not None and self.upstream.connection is not None:
            self.upstream.connection.resume_reading()

    # -- timeouts, failures, teardown -----------------------------------------

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        self.cluster.stats.upstream_rq_timeout.value += 1
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abandon("timeout")
        log.info("request %s %s to cluster %s timed out after %.3gs", self.request.method, self.request.path, self.cluster.name, self.route.timeout)  # type: ignore[union-attr]
        self._fail(504, "upstream request timeout\n", "upstream_response_timeout", "UT")

    def _fail(self, status: int, body: str, details: str, flag: str) -> None:
        self.done = True
        self._cancel_timer()
        self._cancel_try_timer()
        self._release_retries()
        if self.retry_limit_exceeded:  # as Envoy and tcp_proxy print it: UF,URX
            self.stream.add_response_flag(flag)
            flag = "URX"
        self.stream.send_local_reply(status, body, details=details, flag=flag)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_destroy(self) -> None:
        if self.done and self.upstream is None and self.timer is None and self.try_timer is None and not self.retries_held:
            return  # _finished() released everything (the usual case)
        self._cancel_timer()
        self._cancel_try_timer()
        self._release_retries()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abandon()
            self.cluster.stats.upstream_rq_cancelled.value += 1


def _clone_head(head: RequestHead) -> RequestHead:
    """A copy whose headers a codec may extend without touching the
    original (needed when the same request may be sent again)."""
    return RequestHead(
        head.method, head.path, head.authority, Headers(head.headers), head.version, head.scheme,
        head.keep_alive, False, head.content_length, head.chunked,
    )


class UpstreamRequest:
    """One attempt: waits for a pooled connection, then relays the response."""

    connection: Any = None
    pool: Any = None
    response_started = False
    complete = False
    started = False
    start_time = 0.0

    def __init__(self, router: Router, cluster: Any, host: Any) -> None:
        self.router = router
        self.cluster = cluster
        self.host = host

    def start(self) -> None:
        cluster = self.cluster
        stats = cluster.stats
        stats.upstream_rq_total.value += 1
        stats.upstream_rq_active.value += 1
        self.host.active_requests += 1
        self.started = True
        self.start_time = time.monotonic()
        pool = self.pool = cluster.pool_for(self.host)
        pool.acquire(self)

    def _end(self) -> None:
        """Every way an attempt ends (a whole response, a failure, a reset,
        abandonment) comes through here; it counts the attempt out once.
        Subclasses (tracing.py) hook the end of an attempt here."""
        if self.started:
            self.started = False
            self.cluster.stats.upstream_rq_active.value -= 1
            self.host.active_requests -= 1

    # pool callbacks
    def on_pool_ready(self, connection: Any) -> None:
        if self.router.upstream is not self:
            self.pool.release(connection)
            return
        self.connection = connection
        self.router._send_request(self)

    def on_pool_failure(self, reason: str, detail: str) -> None:
        self._end()
        self.router.on_upstream_failure(self, reason, detail, False)

    # connection callbacks
    def on_upstream_headers(self, head: ResponseHead, end_stream: bool) -> None:
        self.cluster.stats.response(head.status)
        if end_stream:
            self._complete()
        if self.router.on_upstream_headers(self, head, end_stream):
            self.response_started = True

    def on_upstream_body(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self._complete()
        self.router.on_upstream_body(data, end_stream)

    def on_upstream_trailers(self, trailers: Headers) -> None:
        self._complete()
        self.router.on_upstream_trailers(trailers)

    def _complete(self) -> None:
        self.complete = True
        self.cluster.stats.upstream_rq_time.record((time.monotonic() - self.start_time) * 1000.0)
        self._end()

    def on_upstream_reset(self, reason: str, detail: str) -> None:
        self._end()
        self.cluster.stats.upstream_rq_rx_reset.value += 1
        log.info("cluster %s host %s: upstream %s (%s)", self.cluster.name, self.host.address, reason, detail)
        self.router.on_upstream_failure(self, reason, detail, self.response_started)

    def on_upstream_write_paused(self) -> None:
        self.router.stream.pause_downstream_reading()

    def on_upstream_write_resumed(self) -> None:
        self.router.stream.resume_downstream_reading()

    def abandon(self, reason: str = "cancelled") -> None:
        """The router no longer wants this attempt (timeout, retry, reset);
        ``reason`` says why (a traced attempt records it)."""
        self._end()
        if self.connection is not None:
            if not self.complete:
                self.connection.detach()
        elif self.pool is not None:
            self.pool.cancel(self)


class DebugUpstreamRequest(UpstreamRequest):
    """An attempt of a request that asked for the debug header (``stream.debug``
    is set): records when it got its connection and its response head."""

    _acquiring = False

    def start(self) -> None:
        self.router.stream.debug.attempt_started(self.router.attempts)
        # An idle pooled connection is handed over inside acquire().
        self._acquiring = True
        try:
            super().start()
        finally:
            self._acquiring = False

    def on_pool_ready(self, connection: Any) -> None:
        if self.router.upstream is self:
            self.router.stream.debug.upstream_connected(pooled=self._acquiring)
        super().on_pool_ready(connection)

    def on_upstream_headers(self, head: ResponseHead, end_stream: bool) -> None:
        self.router.stream.debug.upstream_first_byte()
        super().on_upstream_headers(head, end_stream)


Router.upstream_class = UpstreamRequest
Router.debug_upstream_class = DebugUpstreamRequest


def create(config: dict[str, Any], ctx: BuildContext) -> HttpFilterFactory:
    router_class: type[Router] = Router
    if ctx.tracing is not None:  # tracing: every attempt is a client span (tracing.py)
        from .tracing import TracedRouter

        router_class = TracedRouter
    return HttpFilterFactory(router_class, RouterConfig(config, ctx))


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="router",
            category="filters.http",
            factory=create,
            status="stable",
            security_posture="robust_to_untrusted_downstream",
            description="Routes requests to clusters (the terminal HTTP filter): direct responses, redirects, timeouts, retries.",
        )
    )
