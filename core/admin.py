"""The admin interface: Envoy's admin endpoints, served by aiohttp.

Endpoint names and response shapes follow Envoy's admin API wherever Envoy
has the endpoint, so existing dashboards, probes and scripts keep working.
Everything here reads in-memory state on the event loop: no handler blocks,
and nothing is logged per request except errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable, Iterable, Protocol

from aiohttp import web

log = logging.getLogger("outrider.admin")

TEXT = "text/plain"
JSON_TYPE = "application/json"

#: How long stopping the admin waits for in-flight admin requests. They are
#: all quick, so a long wait only delays shutdown behind a stuck client.
SHUTDOWN_TIMEOUT = 2.0


class AdminServer(Protocol):
    """What the admin interface reads from (and tells) the running server."""

    stats: Any  # StatsStore: iterates over every stat, sorted by name
    registry: Any  # Registry
    config: dict[str, Any]
    config_source: str
    clusters: dict[str, Any]
    listeners: list[Any]
    version: str
    start_time: float
    state: str
    healthcheck_failed: bool
    pid: int
    #: Optional: ``outrider.sinks.AdminEndpoint``s that extensions (stats
    #: sinks) serve, such as the prometheus sink's /stats/prometheus.
    admin_endpoints: list[Any]

    def request_shutdown(self) -> None: ...

    async def refresh_stats(self) -> None:
        """Optional: bring ``stats`` (and the hosts' load) up to date before
        they are read (a supervisor asks its workers)."""


SERVER_KEY = web.AppKey("outrider_server", object)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- response helpers ----------------------------------------------------------


def _server(request: web.Request) -> AdminServer:
    return request.app[SERVER_KEY]  # type: ignore[return-value]


def _text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type=TEXT)


def _json(body: Any) -> web.Response:
    # default=str: the config may carry values a YAML loader produced (dates,
    # custom scalars); a dump must never fail over one of them.
    return web.Response(text=json.dumps(body, indent=2, default=str) + "\n", content_type=JSON_TYPE)


def _formatted(request: web.Request, text: Callable[[], str], data: Callable[[], Any]) -> web.Response:
    """Answer with ``text()`` or, for ``?format=json``, with ``data()`` as JSON.

    Both are callables so that only the requested form is built.
    """
    fmt = request.query.get("format", "text")
    if fmt == "json":
        return _json(data())
    if fmt == "text":
        return _text(text())
    raise web.HTTPBadRequest(text=f"unknown format {fmt!r}: use format=json or format=text\n")


def _lines(lines: Iterable[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def _effective_state(server: AdminServer) -> str:
    # As in Envoy, a live server whose health check was failed by an operator
    # reports DRAINING: it is telling load balancers to take it out.
    if server.state == "LIVE" and server.healthcheck_failed:
        return "DRAINING"
    if server.state == "LIVE" and getattr(server, "supervisor", None) is not None and not _worker_pids(server):
        return "INITIALIZING"  # every worker is being restarted: nothing serves
    return server.state


# -- read-only endpoints ---------------------------------------------------------


async def _index(request: web.Request) -> web.Response:
    return _text(f"outrider admin\n\n{_endpoint_list(_server(request))}")


async def _ready(request: web.Request) -> web.Response:
    state = _effective_state(_server(request))
    return _text(f"{state}\n", status=200 if state == "LIVE" else 503)


async def _stats(request: web.Request) -> web.Response:
    pattern = request.query.get("filter")
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as exc:
        raise web.HTTPBadRequest(text=f"invalid regex in filter {pattern!r}: {exc}\n") from None
    used_only = "usedonly" in request.query
    await _refresh(request)
    store = _server(request).stats
    # Take (name, value) pairs once so both output forms show the same snapshot.
    stats = [
        (s.name, s.value)
        for s in store
        if (regex is None or regex.search(s.name)) and (not used_only or s.value)
    ]
    histograms = [
        (h.name, h.cumulative(), h.interval())
        for h in (store.histograms() if hasattr(store, "histograms") else ())
        if (regex is None or regex.search(h.name)) and (not used_only or h.used)
    ]
    return _formatted(
        request,
        lambda: _lines(f"{name}: {value}" for name, value in stats) + _histograms_text(histograms),
        lambda: {"stats": [{"name": name, "value": value} for name, value in stats] + _histograms_json(histograms)},
    )


# Histograms as Envoy shows them: after the counters and gauges, one line per
# histogram with each quantile as (last closed interval, cumulative), or
# "No recorded values"; in JSON, one last element of "stats".


def _quantile_pairs(cumulative: Any, interval: Any) -> list[tuple[float | None, float | None]]:
    from .stats import SUPPORTED_QUANTILES

    def values(stats: Any) -> list[float | None]:
        if stats is None or not stats.count:
            return [None] * len(SUPPORTED_QUANTILES)
        return list(stats.quantiles(SUPPORTED_QUANTILES))

    return list(zip(values(interval), values(cumulative)))


def _number(value: float | None) -> str:
    return "nan" if value is None else f"{value:.6g}"


def _histograms_text(histograms: list[tuple[str, Any, Any]]) -> str:
    from .stats import SUPPORTED_QUANTILES

    lines = []
    for name, cumulative, interval in histograms:
        if not cumulative.count:
            lines.append(f"{name}: No recorded values")
            continue
        pairs = _quantile_pairs(cumulative, interval)
        lines.append(f"{name}: " + " ".join(
            f"P{q:g}({_number(i)},{_number(c)})" for q, (i, c) in zip(SUPPORTED_QUANTILES, pairs)
        ))
    return _lines(lines)


def _histograms_json(histograms: list[tuple[str, Any, Any]]) -> list[dict[str, Any]]:
    from .stats import SUPPORTED_QUANTILES

    if not histograms:
        return []
    return [{"histograms": {
        "supported_quantiles": list(SUPPORTED_QUANTILES),
        "computed_quantiles": [
            {
                "name": name,
                "values": [{"interval": i, "cumulative": c} for i, c in _quantile_pairs(cumulative, interval)],
            }
            for name, cumulative, interval in histograms
        ],
    }}]


# -- endpoints served by extensions (stats sinks) -------------------------------


def _extension_endpoints(server: Any) -> list[Any]:
    return list(getattr(server, "admin_endpoints", ()) or ())


def _extension_handler(endpoint: Any) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        await _refresh(request)  # e.g. the prometheus sink's page reads the stats
        try:
            status, content_type, body = endpoint.handler(request.query)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        data = body.encode("utf-8") if isinstance(body, str) else body
        return web.Response(body=data, status=status, headers={"Content-Type": content_type})

    return handle


def _health_flags(host: Any) -> str:
    # Only active health checking marks hosts unhealthy today, hence the one flag.
    return "healthy" if host.healthy else "/failed_active_hc"


def _host_stats(host: Any) -> dict[str, int]:
    return {"cx_active": host.active_connections, "rq_active": host.active_requests}


#: Circuit-breaker settings, as Envoy lists them for the default priority.
_BREAKERS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")


def _observability_name(cluster: Any) -> str:
    # Envoy's name for "the name this cluster's stats are under".
    return str(cluster.stats_scope_prefix).removeprefix("cluster.")


def _breakers(cluster: Any) -> dict[str, int]:
    return {name: getattr(cluster, name) for name in _BREAKERS if hasattr(cluster, name)}


def _clusters_text(clusters: list[Any]) -> str:
    lines = []
    for cluster in clusters:
        # Cluster-level lines first, as in Envoy: a cluster shows up even
        # when it has no hosts.
        lines.append(f"{cluster.name}::observability_name::{_observability_name(cluster)}")
        lines += [f"{cluster.name}::default_priority::{name}::{value}" for name, value in _breakers(cluster).items()]
        for host in cluster.hosts:
            prefix = f"{cluster.name}::{host.address}"
            lines += [f"{prefix}::{stat}::{value}" for stat, value in _host_stats(host).items()]
            lines.append(f"{prefix}::health_flags::{_health_flags(host)}")
            lines.append(f"{prefix}::weight::{host.weight}")
    return _lines(lines)


def _clusters_json(clusters: list[Any]) -> dict[str, Any]:
    return {
        "cluster_statuses": [
            {
                "name": cluster.name,
                "observability_name": _observability_name(cluster),
                "circuit_breakers": {"thresholds": [_breakers(cluster)]},
                "host_statuses": [
                    {
                        "address": host.address,
                        "weight": host.weight,
                        "health_status": "HEALTHY" if host.healthy else "UNHEALTHY",
                        "stats": _host_stats(host),
                    }
                    for host in cluster.hosts
                ],
            }
            for cluster in clusters
        ]
    }


async def _refresh(request: web.Request) -> None:
    refresh = getattr(_server(request), "refresh_stats", None)
    if refresh is not None:
        await refresh()


async def _clusters(request: web.Request) -> web.Response:
    await _refresh(request)
    clusters = list(_server(request).clusters.values())
    return _formatted(request, lambda: _clusters_text(clusters), lambda: _clusters_json(clusters))


async def _config_dump(request: web.Request) -> web.Response:
    server = _server(request)
    return _json({"source": server.config_source, "config": server.config})


async def _server_info(request: web.Request) -> web.Response:
    server = _server(request)
    # No hot restart, so the current epoch is the only one.
    uptime = int(time.time() - server.start_time)
    return _json(
        {
            "version": server.version,
            "state": _effective_state(server),
            "uptime_current_epoch": uptime,
            "uptime_all_epochs": uptime,
            "hot_restart_version": "disabled",
            "command_line_options": {"config_path": server.config_source, "concurrency": _concurrency(server)},
            "pid": server.pid,
            # Not in Envoy's answer: the worker processes' ids (workers > 1).
            "worker_pids": _worker_pids(server),
            # Not in Envoy's answer: which asyncio loop serves (uvloop unless
            # --no-uvloop or it is not installed); it changes the numbers.
            "event_loop": _event_loop_name(),
        }
    )


def _concurrency(server: Any) -> int:
    supervisor = getattr(server, "supervisor", None)
    return supervisor.count if supervisor is not None else 1


def _worker_pids(server: Any) -> list[int]:
    supervisor = getattr(server, "supervisor", None)
    return supervisor.pids() if supervisor is not None else []


def _event_loop_name() -> str:
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def _addresses(listener: Any) -> list[str]:
    # Before a listener binds there is nothing to report but what was asked for.
    return list(listener.bound_addresses) or [listener.address]


async def _listeners(request: web.Request) -> web.Response:
    listeners = list(_server(request).listeners)
    return _formatted(
        request,
        lambda: _lines(f"{ls.name}::{address}" for ls in listeners for address in _addresses(ls)),
        lambda: {
            "listener_statuses": [
                {
                    "name": ls.name,
                    "protocol": ls.protocol,
                    "local_address": _addresses(ls)[0],
                    "bound_addresses": list(ls.bound_addresses),
                }
                for ls in listeners
            ]
        },
    )


async def _extensions(request: web.Request) -> web.Response:
    return _json(
        [
            {
                "category": ext.category,
                "name": ext.name,
                "status": ext.status,
                "security_posture": ext.security_posture,
                "description": ext.description,
                "distribution": ext.distribution,
                "version": ext.version,
                "listener_protocol": ext.listener_protocol,
            }
            for ext in _server(request).registry.all()
        ]
    )


# -- /route: explain a routing decision ------------------------------------------

_ROUTE_PARAMS = ("authority", "path", "method", "scheme", "header", "listener")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f"/route: {message}\n")


def _route_param(query: Any, name: str, default: str | None = None) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise _bad_request(f"parameter {name!r} given {len(values)} times; give it once")
    return values[0] if values else default


def _route_listener(server: AdminServer, name: str | None) -> Any:
    http = [ls for ls in server.listeners if getattr(ls, "http", None) is not None]
    names = ", ".join(ls.name for ls in http) or "none"
    if name is None:
        if not http:
            raise _bad_request("no HTTP listener is configured, so there is no route table to explain")
        return http[0]
    for ls in http:
        if ls.name == name:
            return ls
    if any(ls.name == name for ls in server.listeners):
        raise _bad_request(f"listener {name!r} is not an HTTP listener (HTTP listeners: {names})")
    raise _bad_request(f"no listener named {name!r} (HTTP listeners: {names})")


def _route_request(query: Any) -> Any:
    """The RequestHead that the query describes (400 for anything malformed)."""
    from .http.message import Headers, RequestHead

    unknown = sorted(set(query) - set(_ROUTE_PARAMS))
    if unknown:
        raise _bad_request(
            f"unknown parameter {unknown[0]!r}; the parameters are authority, path, method (default GET), "
            "scheme (http or https, default http), header=NAME:VALUE (repeatable) and listener=NAME"
        )
    authority = _route_param(query, "authority")
    if not authority:
        raise _bad_request("give the request's authority (its Host), e.g. authority=api.example.com")
    if any(c.isspace() or not c.isprintable() or c in "/?#@" for c in authority):
        raise _bad_request(f"authority {authority!r} is not a host or host:port")
    path = _route_param(query, "path")
    if not path:
        raise _bad_request("give the request's path, e.g. path=/v1/users (URL-encode a query: path=%2Fv1%3Fa%3D1)")
    if not path.startswith("/") or any(c.isspace() or not c.isprintable() for c in path):
        raise _bad_request(f"path {path!r} must start with '/' and hold no spaces or control characters")
    method = _route_param(query, "method", "GET")
    if not method or not _TOKEN.fullmatch(method):
        raise _bad_request(f"method {method!r} is not an HTTP method token")
    scheme = _route_param(query, "scheme", "http")
    if scheme not in ("http", "https"):
        raise _bad_request(f"scheme {scheme!r}: use http or https")
    headers = Headers()
    for item in query.getall("header", []):
        if item.startswith(":"):
            raise _bad_request(f"header {item!r}: give pseudo-headers with the method, authority, path and scheme parameters")
        name, sep, value = item.partition(":")
        name, value = name.strip().lower(), value.strip()
        if not sep or not name:
            raise _bad_request(f"header {item!r}: write header=NAME:VALUE, e.g. header=x-canary:1")
        if not _TOKEN.fullmatch(name):
            raise _bad_request(f"header {item!r}: {name!r} is not a valid header name")
        if name == "host":
            raise _bad_request("give the Host with the authority parameter, not as a header")
        if any(c in "\r\n\0" for c in value):
            raise _bad_request(f"header {item!r}: the value holds a control character")
        headers.append((name, value))
    return RequestHead(method, path, authority, headers, scheme=scheme)


async def _route(request: web.Request) -> web.Response:
    """Which virtual host, route and action a request would get, and why the
    earlier routes did not match; nothing is sent upstream."""
    from .http.explain import explain_route

    server = _server(request)
    head = _route_request(request.query)
    listener = _route_listener(server, _route_param(request.query, "listener"))
    return _json({"listener": listener.name, **explain_route(listener.http.route_table, head)})


# -- mutating endpoints (POST only) ---------------------------------------------


async def _healthcheck_fail(request: web.Request) -> web.Response:
    _server(request).healthcheck_failed = True
    return _text("OK\n")


async def _healthcheck_ok(request: web.Request) -> web.Response:
    _server(request).healthcheck_failed = False
    return _text("OK\n")


async def _quitquitquit(request: web.Request) -> web.Response:
    response = _text("OK\n")
    # The process is going away: don't leave the client on a keep-alive
    # connection, and finish the answer before asking for the shutdown.
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    asyncio.get_running_loop().call_soon(_server(request).request_shutdown)
    return response


#: (method, path, handler, one-line description): drives the routes, the index
#: and the 404 hint, so they cannot disagree.
ENDPOINTS: tuple[tuple[str, str, Handler, str], ...] = (
    ("GET", "/", _index, "this list"),
    ("GET", "/ready", _ready, "200 LIVE when serving, else 503 and the state"),
    ("GET", "/stats", _stats, "all stats; ?filter=REGEX, ?usedonly, ?format=json"),
    ("GET", "/clusters", _clusters, "upstream hosts, their load and health; ?format=json"),
    ("GET", "/config_dump", _config_dump, "the running configuration, as JSON"),
    ("GET", "/server_info", _server_info, "version, state, uptime, pid"),
    ("GET", "/listeners", _listeners, "listeners and their bound addresses; ?format=json"),
    ("GET", "/extensions", _extensions, "installed extensions, as JSON"),
    ("GET", "/route", _route, "explain routing: ?authority=H&path=P[&method=M&header=N:V&listener=L]"),
    ("POST", "/healthcheck/fail", _healthcheck_fail, "fail the health check (/ready answers 503)"),
    ("POST", "/healthcheck/ok", _healthcheck_ok, "undo /healthcheck/fail"),
    ("POST", "/quitquitquit", _quitquitquit, "shut the server down gracefully"),
)


def _endpoint_list(server: Any = None) -> str:
    endpoints = [(method, path, doc) for method, path, _, doc in ENDPOINTS]
    endpoints += [("GET", e.path, e.description) for e in _extension_endpoints(server)]
    return _lines(f"  {method:<4} {path:<18} {doc}" for method, path, doc in endpoints)


#: A hint for admin paths that exist only when an extension is configured.
_NOT_CONFIGURED = {
    "/stats/prometheus": "/stats/prometheus is served by the prometheus stats sink, which this config "
    "turned off: list it, as in `stats: {sinks: [prometheus, ...]}`\n",
}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A 404 that says what exists; a logged 500 for a bug in a handler."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        hint = _NOT_CONFIGURED.get(request.path, "")
        listing = _endpoint_list(request.app[SERVER_KEY])
        return _text(f"no admin endpoint at {request.path}; {hint}the endpoints are:\n{listing}", status=404)
    except web.HTTPException:
        raise  # 400s from handlers, aiohttp's 405
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return _text("internal error; see the server log\n", status=500)


# -- public API -----------------------------------------------------------------


def build_admin_app(server: AdminServer) -> web.Application:
    """The admin aiohttp application for ``server`` (not yet bound)."""
    app = web.Application(middlewares=[_errors])
    app[SERVER_KEY] = server
    for method, path, handler, _ in ENDPOINTS:
        if method == "GET":
            app.router.add_get(path, handler)  # also answers HEAD, which some probes send
        else:
            app.router.add_route(method, path, handler)
    for endpoint in _extension_endpoints(server):
        app.router.add_get(endpoint.path, _extension_handler(endpoint))
    return app


async def start_admin(server: AdminServer, host: str, port: int) -> web.AppRunner:
    """Serve the admin interface on ``host:port``; the caller owns the returned
    runner and calls ``runner.cleanup()`` to stop it. ``port`` 0 picks a free
    port: read it back with :func:`bound_port`. A bind failure raises OSError."""
    # access_log=None: per-request logging is the data path's job, not ours.
    runner = web.AppRunner(build_admin_app(server), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        # Addresses are written "[::1]:9901"; the socket wants the bare host.
        await web.TCPSite(runner, host.strip("[]"), port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port ``runner`` (from :func:`start_admin`) actually listens on."""
    return int(runner.addresses[0][1])
