"""The per-request debug header: "why did this request go there, and where
did its time go", for trusted clients.

Configured per HTTP listener::

    http:
      debug: {header: x-outrider-debug, allow_from: [127.0.0.0/8, "::1/128"]}

A request that carries the header (any value) from a downstream address
inside ``allow_from`` gets a response header of the same name::

    x-outrider-debug: vhost=api; route=api/1; cluster=api; upstream=127.0.0.1:8080;
                      attempts=1; cx=pooled; route_ms=0.021; connect_ms=0.034;
                      first_byte_ms=1.302; total_ms=1.362

(one line). The request header is removed before anything else sees it,
whether the request was allowed or not; a request from outside
``allow_from`` gets no debug information and counts
``http.<stat_prefix>.debug_denied`` (``debug_allowed`` counts the others).
The address checked is the TCP peer's, never ``X-Forwarded-For``.

Cost: with no ``debug:`` block nothing here runs; the listener creates plain
:class:`ActiveStream` objects and the router does one attribute test per
request (``stream.debug is not None``). With the block, the listener's
``new_stream`` becomes :meth:`DebugPolicy.new_stream`, which looks for the
header in each request; only allowed requests get a :class:`DebugStream`,
which records the timestamps and writes the response header.
"""

from __future__ import annotations

import ipaddress
import re
import time
from typing import TYPE_CHECKING, Any

from .conn_manager import _HEADERS, ActiveStream
from .message import RequestHead

if TYPE_CHECKING:  # pragma: no cover
    from .conn_manager import HttpConnectionManager
    from .routing import Route

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_DECISION_CACHE_LIMIT = 4096
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


class DebugInfo:
    """What one debug request records on its way through the proxy.

    The terminal filter (the router) fills in the upstream part by calling
    :meth:`attempt_started`, :meth:`upstream_connected` and
    :meth:`upstream_first_byte`; each new attempt starts the upstream part
    afresh, so the timings are those of the attempt whose response was used.
    All times are ``time.monotonic()`` values.
    """

    __slots__ = ("vhost", "route_time", "attempts", "connected_time", "first_byte_time", "pooled")

    def __init__(self) -> None:
        self.vhost: str | None = None
        self.route_time: float | None = None
        self.attempts = 0
        self.connected_time: float | None = None
        self.first_byte_time: float | None = None
        self.pooled: bool | None = None

    def attempt_started(self, attempt: int) -> None:
        """Attempt number ``attempt`` (1 for the first try) is starting."""
        self.attempts = attempt
        self.connected_time = self.first_byte_time = self.pooled = None

    def upstream_connected(self, pooled: bool) -> None:
        """The current attempt has its upstream connection. ``pooled``: an
        idle keep-alive connection was ready at once; otherwise the attempt
        waited for one (a new connection, usually)."""
        self.connected_time = time.monotonic()
        self.pooled = pooled

    def upstream_first_byte(self) -> None:
        """The current attempt's response head has arrived."""
        self.first_byte_time = time.monotonic()

    def render(self, stream: ActiveStream) -> str:
        """The response header's value (see the module docstring)."""
        start = stream.start_time
        route = stream.route
        parts = [f"vhost={_clean(self.vhost or '-')}", f"route={_clean(route.name) if route is not None else '-'}"]
        if stream.upstream_cluster:
            parts.append(f"cluster={_clean(stream.upstream_cluster)}")
        if stream.upstream_host:
            parts.append(f"upstream={stream.upstream_host}")
        if self.attempts:
            parts.append(f"attempts={self.attempts}")
        if self.pooled is not None:
            parts.append("cx=pooled" if self.pooled else "cx=waited")
        if stream.response_flags:
            parts.append(f"flags={','.join(stream.response_flags)}")
        if stream.response_code_details:
            parts.append(f"details={_clean(stream.response_code_details)}")
        if self.route_time is not None:
            parts.append(f"route_ms={(self.route_time - start) * 1000.0:.3f}")
        if self.connected_time is not None:
            parts.append(f"connect_ms={(self.connected_time - start) * 1000.0:.3f}")
        if self.first_byte_time is not None:
            parts.append(f"first_byte_ms={(self.first_byte_time - start) * 1000.0:.3f}")
        parts.append(f"total_ms={(time.monotonic() - start) * 1000.0:.3f}")
        return "; ".join(parts)


def _clean(value: str) -> str:
    """``value`` made safe for one ``key=value`` item: no separators, no
    control characters (names come from the config, details from errors)."""
    if value.isprintable() and ";" not in value:
        return value
    return "".join("_" if c == ";" or not c.isprintable() else c for c in value)


class DebugStream(ActiveStream):
    """The stream of an allowed debug request: an :class:`ActiveStream` that
    notes when its route was chosen and adds the debug response header."""

    _route: "Route | None" = None

    def __init__(self, hcm: "HttpConnectionManager", connection: Any, request: RequestHead) -> None:
        self.debug = DebugInfo()
        super().__init__(hcm, connection, request)

    # ActiveStream.decode_headers chooses the route by assigning
    # ``self.route``; this property is how a debug stream times that choice
    # (and remembers the virtual host before a host_rewrite changes the
    # authority) without a test on every ordinary stream.
    @property  # type: ignore[override]
    def route(self) -> "Route | None":
        return self._route

    @route.setter
    def route(self, route: "Route | None") -> None:
        self._route = route
        info = self.debug
        if info.route_time is None:
            info.route_time = time.monotonic()
        if route is not None:
            info.vhost = route.vhost.name
        elif info.vhost is None:
            vhost = self.hcm.route_table.virtual_host(self.request.authority)
            info.vhost = vhost.name if vhost is not None else None

    def _write(self, kind: int, payload: Any, end_stream: bool) -> None:
        if kind == _HEADERS:
            # Last, after every filter: no filter can drop or forge it.
            payload.headers.set(self.hcm.debug.header, self.debug.render(self))
        super()._write(kind, payload, end_stream)


class DebugPolicy:
    """A listener's ``debug:`` block, compiled once at config time."""

    def __init__(self, config: dict[str, Any], hcm: "HttpConnectionManager") -> None:
        self.hcm = hcm
        self.header = str(config.get("header") or "x-outrider-debug").lower()
        if not _TOKEN.fullmatch(self.header):
            raise ValueError(f"listener {hcm.listener_name!r}: debug.header {self.header!r} is not a valid header name")
        self.networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in config["allow_from"]
        )
        scope = hcm.stats.scope
        self.allowed_counter = scope.counter("debug_allowed")
        self.denied_counter = scope.counter("debug_denied")
        #: Decisions by peer address: parsing an address costs more than the
        #: rest of the check. Bounded; cleared when full.
        self._decided: dict[str, bool] = {}

    def allows(self, remote_ip: str) -> bool:
        """Whether ``remote_ip`` (the TCP peer) lies inside ``allow_from``."""
        decided = self._decided.get(remote_ip)
        if decided is None:
            if len(self._decided) >= _DECISION_CACHE_LIMIT:
                self._decided.clear()
            decided = self._decided[remote_ip] = self._allows(remote_ip)
        return decided

    def _allows(self, remote_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(remote_ip.partition("%")[0])
        except ValueError:
            return False  # unknown ("") or unparsable: never trusted
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d on a dual-stack socket
        for network in self.networks:
            if address in network or (mapped is not None and mapped in network):
                return True
        return False

    def new_stream(self, connection: Any, request: RequestHead) -> ActiveStream:
        """Replaces ``HttpConnectionManager.new_stream`` on a listener with a
        ``debug:`` block."""
        headers = request.headers
        name = self.header
        if headers.has(name):
            headers.remove_all(name)
            if self.allows(connection.remote_ip):
                self.allowed_counter.value += 1
                return DebugStream(self.hcm, connection, request)
            self.denied_counter.value += 1
        return ActiveStream(self.hcm, connection, request)
