"""What the route table would do with a request, and why: the admin's
``/route`` endpoint. Nothing here is on the data path, and nothing is sent
anywhere: the answer is computed from the same compiled objects the router
uses (``RouteTable.match_virtual_host``, ``Route.why_not``,
``RedirectAction.location``, ``HeaderOps.apply``, ``Route.rewrite_path``), so
it cannot drift from what the proxy does.
"""

from __future__ import annotations

from typing import Any

from .message import Headers, RequestHead
from .routing import HeaderOps, Route, RouteTable, VirtualHost

#: What the proxy adds to every proxied request besides the route's own
#: operations (depending on the listener's settings), for the answer's note.
_PROXY_HEADERS_NOTE = (
    "as the router would send it, before the headers the connection manager adds "
    "(x-request-id, x-forwarded-for, x-forwarded-proto) and before any change by "
    "the HTTP filters that run ahead of the router"
)


def explain_route(table: RouteTable, request: RequestHead) -> dict[str, Any]:
    """The routing decision for ``request`` as a JSON-ready mapping.

    Keys: ``request`` (what was asked), ``virtual_host`` (``name``, ``match``:
    exact / suffix / prefix / wildcard, the ``domain`` that matched, all
    ``domains``; ``None`` if none matched), ``route`` (``name``, ``index``,
    ``match``; ``None`` if none matched), ``not_matched`` (each earlier route
    of the virtual host with the ``reason`` it did not match), ``action``
    (``type``: cluster / weighted_clusters / direct_response / redirect /
    no_route) and ``summary`` (one sentence). Route actions add
    ``rewrites``, ``upstream_request``, ``timeout`` (seconds, 0 = none) and
    ``retry_policy``; any route adds ``per_filter_config`` when it has one.
    """
    answer: dict[str, Any] = {
        "request": {
            "method": request.method,
            "scheme": request.scheme,
            "authority": request.authority,
            "path": request.path,
            "headers": [[name, value] for name, value in request.headers],
        }
    }
    vhost, how, domain = table.match_virtual_host(request.authority)
    if vhost is None:
        domains = sorted({d for vh in table.virtual_hosts for d in vh.domains})
        answer.update(
            virtual_host=None,
            route=None,
            not_matched=[],
            action=_no_route(f"no virtual host has a domain matching authority {request.authority!r}"),
            summary=f"no virtual host matches authority {request.authority!r} "
            f"(domains: {', '.join(domains) or 'none'}): the proxy answers 404 (NR)",
        )
        return answer
    answer["virtual_host"] = {"name": vhost.name, "match": how, "domain": domain, "domains": list(vhost.domains)}
    answer["route"] = None  # filled in below; keeps the keys in reading order
    not_matched = []
    chosen: Route | None = None
    for route in vhost.routes:
        reason = route.why_not(request)
        if reason is None:
            chosen = route
            break
        not_matched.append({"index": route.index, "name": route.name, "match": route.match_spec, "reason": reason})
    answer["not_matched"] = not_matched
    where = f"virtual host {vhost.name!r} ({how} domain {domain!r})"
    if chosen is None:
        answer.update(
            action=_no_route(f"no route of virtual host {vhost.name!r} matches"),
            summary=f"{where}: none of its {len(vhost.routes)} routes matches: the proxy answers 404 (NR)",
        )
        return answer
    route = chosen
    answer["route"] = {"name": route.name, "index": route.index, "match": route.match_spec}
    where = f"{where}, route {route.name!r}"
    if route.direct_response is not None:
        status, body, headers = route.direct_response
        answer["action"] = {
            "type": "direct_response",
            "status": status,
            "body": body.decode("utf-8", "replace"),
            "headers": [{"name": n, "value": v} for n, v in headers],
        }
        answer["rewrites"] = _header_ops(route.vhost, route, request=False)
        answer["summary"] = f"{where}: answered by the proxy with {status}"
    elif route.redirect is not None:
        location = route.redirect.location(request, route)
        answer["action"] = {"type": "redirect", "status": route.redirect.status, "location": location}
        answer["summary"] = f"{where}: redirected with {route.redirect.status} to {location}"
    else:
        if route.cluster is not None:
            answer["action"] = {"type": "cluster", "cluster": route.cluster}
            target = f"cluster {route.cluster!r}"
        else:
            total = route.total_weight
            clusters = [
                {"name": wc["name"], "weight": int(wc["weight"]), "percent": round(100.0 * int(wc["weight"]) / total, 2) if total else 0.0}
                for wc in route.action.get("weighted_clusters", ())
            ]
            answer["action"] = {"type": "weighted_clusters", "total_weight": total, "clusters": clusters}
            target = "one of clusters " + ", ".join(f"{c['name']!r} ({c['percent']:g}%)" for c in clusters)
        answer.update(_route_action(route, request))
        answer["summary"] = f"{where}: proxied to {target}"
    if route.per_filter_config:
        answer["per_filter_config"] = route.per_filter_config
    return answer


def _no_route(reason: str) -> dict[str, Any]:
    return {"type": "no_route", "status": 404, "response_flags": "NR", "reason": reason}


def _ops(ops: HeaderOps, source: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    added = [{"name": n, "value": v, "append": append, "from": source} for n, v, append in ops.add]
    removed = [{"name": n, "from": source} for n in sorted(ops.remove)]
    return added, removed


def _header_ops(vhost: VirtualHost, route: Route, request: bool = True) -> dict[str, Any]:
    """The header operations that would apply, in the order the router applies
    them (requests: virtual host then route; responses: route then virtual host)."""
    out: dict[str, Any] = {}
    if request:
        vh_add, vh_remove = _ops(vhost.request_header_ops, "virtual_host")
        rt_add, rt_remove = _ops(route.request_header_ops, "route")
        out["request_headers_to_add"] = vh_add + rt_add
        out["request_headers_to_remove"] = vh_remove + rt_remove
    rt_add, rt_remove = _ops(route.response_header_ops, "route")
    vh_add, vh_remove = _ops(vhost.response_header_ops, "virtual_host")
    out["response_headers_to_add"] = rt_add + vh_add
    out["response_headers_to_remove"] = rt_remove + vh_remove
    return out


def _route_action(route: Route, request: RequestHead) -> dict[str, Any]:
    """Rewrites, the resulting upstream request, timeout and retry policy.
    Mirrors the router's order: header operations, then path, then host."""
    headers = Headers(request.headers)
    if route.vhost.request_header_ops:
        route.vhost.request_header_ops.apply(headers)
    if route.request_header_ops:
        route.request_header_ops.apply(headers)
    path = request.path
    path_rewrite = None
    if route.prefix_rewrite is not None:
        new_path = route.rewrite_path(path)
        path_rewrite = {"prefix": route.prefix, "prefix_rewrite": route.prefix_rewrite, "from": path, "to": new_path}
        if new_path != path:
            headers.append(("x-envoy-original-path", path))
            path = new_path
    authority = request.authority
    host_rewrite = None
    if route.host_rewrite:
        host_rewrite = {"from": authority, "to": route.host_rewrite}
        authority = route.host_rewrite
    rewrites = {"path": path_rewrite, "host": host_rewrite, **_header_ops(route.vhost, route)}
    policy = route.retry_policy
    retry = None
    if policy:
        retry = dict(policy)
        retry.setdefault("num_retries", 1)  # the router's default when a policy is given
    return {
        "rewrites": rewrites,
        "upstream_request": {
            "method": request.method,
            "authority": authority,
            "path": path,
            "headers": [[name, value] for name, value in headers],
            "note": _PROXY_HEADERS_NOTE,
        },
        "timeout": route.timeout,
        "retry_policy": retry,
    }
