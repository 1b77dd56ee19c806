"""The router's upstream attempts when the config has ``tracing:``.

``create`` picks :class:`TracedRouter` at config time when ``ctx.tracing``
is set, so a server without tracing runs the plain classes and pays nothing
per request. With it, each attempt (retries included) starts a CLIENT span,
a child of the request's server span (``stream.span``), and the attempt's
request carries that span's context, so the upstream continues the trace.
When the request is not sampled, ``stream.span`` records nothing and every
attempt carries its context, with the not-sampled decision.
"""

from __future__ import annotations

from typing import Any

from outrider.http.message import ResponseHead
from outrider.tracing import Endpoint

from . import DebugUpstreamRequest, Router, UpstreamRequest


class TracedUpstreamRequest(UpstreamRequest):
    """An attempt with a client span: started with the attempt, tagged with
    the status or the reason it failed, finished when the attempt ends."""

    span: Any = None

    def start(self) -> None:
        router = self.router
        request = router.request
        span = router.stream.span
        if span.recording:  # else every attempt carries the request's not-sampled context
            cluster, host = self.cluster, self.host
            span = span.child(f"router {cluster.name} egress", Endpoint(host.host, host.port))
            tags = span.tags
            tags["component"] = "proxy"
            tags["upstream_cluster"] = cluster.name
            tags["upstream_address"] = host.address
            tags["http.method"] = request.method
            tags["http.url"] = f"{request.scheme}://{request.authority}{request.path}"
        # Into the router's head: it is copied for each attempt (when the
        # request may be retried) once the connection is ready, after this.
        span.inject(request.headers)
        self.span = span
        super().start()

    def on_upstream_headers(self, head: ResponseHead, end_stream: bool) -> None:
        span = self.span
        span.set_tag("http.status_code", head.status)
        if head.status >= 500:
            span.set_tag("error", "true")
        super().on_upstream_headers(head, end_stream)

    def on_pool_failure(self, reason: str, detail: str) -> None:
        self.span.set_tag("error", reason)
        super().on_pool_failure(reason, detail)

    def on_upstream_reset(self, reason: str, detail: str) -> None:
        self.span.set_tag("error", reason)
        super().on_upstream_reset(reason, detail)

    def abandon(self, reason: str = "cancelled") -> None:
        span = self.span
        # A response that is being retried already says what was wrong.
        if self.started and span.recording and "http.status_code" not in span.tags:
            span.set_tag("error", reason)
        super().abandon(reason)

    def _end(self) -> None:
        if self.started:  # every way an attempt ends comes through here once
            self.span.finish()
        super()._end()


class TracedDebugUpstreamRequest(TracedUpstreamRequest, DebugUpstreamRequest):
    """A traced attempt of a request that asked for the debug header."""


class TracedRouter(Router):
    """The router of a server with tracing on."""

    upstream_class = TracedUpstreamRequest
    debug_upstream_class = TracedDebugUpstreamRequest
