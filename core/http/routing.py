"""Virtual hosts and routes, compiled once at config time.

``RouteTable.route(request)`` is on the hot path: a dict lookup for the
virtual host (cached per authority) and, per route, a string test or a
precompiled regex.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl

from ..timeouts import TimeoutQueue
from .message import Headers, RequestHead

_PREFIX, _PATH, _REGEX = 0, 1, 2
_VHOST_CACHE_LIMIT = 4096


def _header_value(request: RequestHead, name: str) -> str | None:
    if name[0] == ":":
        if name == ":method":
            return request.method
        if name == ":authority":
            return request.authority
        if name == ":path":
            return request.path
        if name == ":scheme":
            return request.scheme
        return None
    values = request.headers.get_all(name)
    return ",".join(values) if values else None


def _describe_matcher(spec: dict[str, Any]) -> str:
    """What a matcher spec wants, in words (for explanations, not the hot path)."""
    for key in ("exact", "prefix", "suffix", "contains", "safe_regex"):
        if key in spec:
            return f"{key} {spec[key]!r}"
    return "present" if spec.get("present", True) else "absent"


def _value_matcher(spec: dict[str, Any]) -> Callable[[str | None], bool]:
    """A predicate over one (possibly absent) value, from a matcher spec."""
    if "exact" in spec:
        exact = spec["exact"]
        test = lambda v: v == exact  # noqa: E731
    elif "prefix" in spec:
        prefix = spec["prefix"]
        test = lambda v: v.startswith(prefix)  # noqa: E731
    elif "suffix" in spec:
        suffix = spec["suffix"]
        test = lambda v: v.endswith(suffix)  # noqa: E731
    elif "contains" in spec:
        part = spec["contains"]
        test = lambda v: part in v  # noqa: E731
    elif "safe_regex" in spec:
        regex = re.compile(spec["safe_regex"])
        test = lambda v: regex.fullmatch(v) is not None  # noqa: E731
    else:
        present = spec.get("present", True)
        return lambda v: (v is not None) == present

    return lambda v: v is not None and test(v)


class HeaderMatcher:
    __slots__ = ("name", "test", "invert", "wanted")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name = spec["name"].lower()
        self.test = _value_matcher(spec)
        self.invert = bool(spec.get("invert_match", False))
        self.wanted = ("not " if self.invert else "") + _describe_matcher(spec)

    def matches(self, request: RequestHead) -> bool:
        return self.test(_header_value(request, self.name)) != self.invert

    def explain(self) -> str:
        return f"header {self.name!r}"

    def why_not(self, request: RequestHead) -> str:
        """Why this matcher rejects ``request`` (call it only when it does)."""
        return f"header matcher on {self.name!r} does not match: wanted {self.wanted}, got {_seen(_header_value(request, self.name), 'header')}"


class QueryMatcher:
    __slots__ = ("name", "test", "wanted")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name = spec["name"]
        self.test = _value_matcher(spec)
        self.wanted = _describe_matcher(spec)

    def matches(self, query: dict[str, str]) -> bool:
        return self.test(query.get(self.name))

    def why_not(self, query: dict[str, str]) -> str:
        return f"query parameter matcher on {self.name!r} does not match: wanted {self.wanted}, got {_seen(query.get(self.name), 'parameter')}"


def _seen(value: str | None, what: str) -> str:
    return f"no such {what}" if value is None else repr(value)


class HeaderOps:
    """Header additions and removals of a route or a virtual host."""

    __slots__ = ("add", "remove")

    def __init__(self, add: Iterable[dict[str, Any]] = (), remove: Iterable[str] = ()) -> None:
        self.add = [(h["name"].lower(), h["value"], h.get("append", True)) for h in add]
        self.remove = frozenset(n.lower() for n in remove)

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)

    def apply(self, headers: Headers) -> None:
        if self.remove:
            remove = self.remove
            headers[:] = [kv for kv in headers if kv[0] not in remove]
        for name, value, append in self.add:
            if append:
                headers.append((name, value))
            else:
                headers.set(name, value)


class RedirectAction:
    __slots__ = ("scheme", "host", "port", "path", "prefix_rewrite", "strip_query", "status")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.scheme = "https" if spec.get("https_redirect") else spec.get("scheme_redirect")
        self.host = spec.get("host_redirect")
        self.port = spec.get("port_redirect")
        self.path = spec.get("path_redirect")
        self.prefix_rewrite = spec.get("prefix_rewrite")
        self.strip_query = bool(spec.get("strip_query", False))
        self.status = int(spec.get("response_code", 301))

    def location(self, request: RequestHead, route: "Route") -> str:
        scheme = self.scheme or request.scheme
        if self.host is not None:
            host = self.host
        else:
            host = request.authority
            if self.scheme and self.scheme != request.scheme:
                # The old port belongs to the old scheme.
                host = _strip_port(host)
        if self.port:
            host = f"{_strip_port(host)}:{self.port}"
        path, sep, query = request.path.partition("?")
        if self.path is not None:
            path = self.path
        elif self.prefix_rewrite is not None and route.prefix is not None:
            path = self.prefix_rewrite + path[len(route.prefix):]
        if sep and not self.strip_query:
            path = f"{path}?{query}"
        return f"{scheme}://{host}{path}"


def _strip_port(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1]
    return authority.rsplit(":", 1)[0] if ":" in authority else authority


class Route:
    """One compiled route: its match, its action, its header operations."""

    timeouts: TimeoutQueue | None = None
    per_try_timeouts: TimeoutQueue | None = None

    def __init__(self, spec: dict[str, Any], vhost: "VirtualHost", index: int) -> None:
        self.vhost = vhost
        self.index = index
        self.name = spec.get("name") or f"{vhost.name}/{index}"
        match = spec["match"]
        self.case_sensitive = match.get("case_sensitive", True)
        self.prefix: str | None = None
        if "prefix" in match:
            self.kind, self.prefix = _PREFIX, match["prefix"]
            self.pattern = self.prefix if self.case_sensitive else self.prefix.lower()
        elif "path" in match:
            self.kind = _PATH
            self.pattern = match["path"] if self.case_sensitive else match["path"].lower()
        else:
            self.kind = _REGEX
            self.pattern = re.compile(match["safe_regex"], 0 if self.case_sensitive else re.IGNORECASE)
        self.match_spec = match
        self.header_matchers = [HeaderMatcher(h) for h in match.get("headers", ())]
        self.query_matchers = [QueryMatcher(q) for q in match.get("query_parameters", ())]
        #: The prefix, when a case-sensitive prefix is all this route matches
        #: on: VirtualHost.route then tests it inline instead of calling matches().
        self.plain_prefix: str | None = None
        if self.kind == _PREFIX and self.case_sensitive and not self.header_matchers and not self.query_matchers:
            self.plain_prefix = self.prefix

        self.request_header_ops = HeaderOps(spec.get("request_headers_to_add", ()), spec.get("request_headers_to_remove", ()))
        self.response_header_ops = HeaderOps(spec.get("response_headers_to_add", ()), spec.get("response_headers_to_remove", ()))
        #: The non-empty header operations, in the order they apply: a request
        #: gets the virtual host's then the route's, a response the route's
        #: then the virtual host's. Per request, an empty tuple costs no call.
        self.request_header_chain = tuple(ops for ops in (vhost.request_header_ops, self.request_header_ops) if ops)
        self.response_header_chain = tuple(ops for ops in (self.response_header_ops, vhost.response_header_ops) if ops)
        self.per_filter_config: dict[str, Any] = spec.get("per_filter_config", {})

        self.cluster: str | None = None
        self.weighted: list[tuple[int, str]] = []
        self.total_weight = 0
        self.direct_response: tuple[int, bytes, list[tuple[str, str]]] | None = None
        self.redirect: RedirectAction | None = None
        self.action = spec.get("route")
        if "route" in spec:
            action = spec["route"]
            self.cluster = action.get("cluster")
            for wc in action.get("weighted_clusters", ()):
                self.total_weight += int(wc["weight"])
                self.weighted.append((self.total_weight, wc["name"]))
            self.prefix_rewrite: str | None = action.get("prefix_rewrite")
            self.host_rewrite: str | None = action.get("host_rewrite")
            self.timeout: float = float(action.get("timeout", 15.0))
            #: One queue serves every request's timeout on this route.
            self.timeouts = TimeoutQueue(self.timeout) if self.timeout else None
            self.idle_timeout: float | None = action.get("idle_timeout")
            self.retry_policy: dict[str, Any] | None = action.get("retry_policy")
            per_try = (self.retry_policy or {}).get("per_try_timeout")
            self.per_try_timeouts = TimeoutQueue(float(per_try)) if per_try else None
        elif "direct_response" in spec:
            dr = spec["direct_response"]
            body = dr.get("body", "")
            self.direct_response = (
                int(dr["status"]),
                body.encode("utf-8") if isinstance(body, str) else bytes(body),
                [(h["name"].lower(), h["value"]) for h in dr.get("headers", ())],
            )
        elif "redirect" in spec:
            self.redirect = RedirectAction(spec["redirect"])

    def path_matches(self, path: str) -> bool:
        if not self.case_sensitive:
            path = path.lower()
        kind = self.kind
        if kind == _PREFIX:
            return path.startswith(self.pattern)
        path_only = path.partition("?")[0]
        if kind == _PATH:
            return path_only == self.pattern
        return self.pattern.fullmatch(path_only) is not None

    def matches(self, request: RequestHead) -> bool:
        if not self.path_matches(request.path):
            return False
        for matcher in self.header_matchers:
            if not matcher.matches(request):
                return False
        if self.query_matchers:
            query = dict(parse_qsl(request.path.partition("?")[2], keep_blank_values=True))
            for qm in self.query_matchers:
                if not qm.matches(query):
                    return False
        return True

    def why_not(self, request: RequestHead) -> str | None:
        """Why this route does not match ``request`` (``None`` if it does)."""
        if not self.path_matches(request.path):
            what = ("prefix", "path", "safe_regex")[self.kind]
            # A prefix sees the whole path; path and safe_regex the part before '?'.
            seen = request.path if self.kind == _PREFIX else request.path.partition("?")[0]
            case = "" if self.case_sensitive else " (ignoring case)"
            return f"{what} {self.match_spec[what]!r} does not match path {seen!r}{case}"
        for matcher in self.header_matchers:
            if not matcher.matches(request):
                return matcher.why_not(request)
        if self.query_matchers:
            query = dict(parse_qsl(request.path.partition("?")[2], keep_blank_values=True))
            for qm in self.query_matchers:
                if not qm.matches(query):
                    return qm.why_not(query)
        return None

    def pick_cluster(self) -> str:
        """The cluster for one request (a weighted draw when configured so)."""
        if self.cluster is not None:
            return self.cluster
        point = random.random() * self.total_weight
        for bound, name in self.weighted:
            if point < bound:
                return name
        return self.weighted[-1][1]

    def rewrite_path(self, path: str) -> str:
        if self.prefix_rewrite is None or self.prefix is None:
            return path
        return self.prefix_rewrite + path[len(self.prefix):]


class VirtualHost:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.name = spec["name"]
        self.domains = [d.lower() for d in spec["domains"]]
        self.request_header_ops = HeaderOps(spec.get("request_headers_to_add", ()), spec.get("request_headers_to_remove", ()))
        self.response_header_ops = HeaderOps(spec.get("response_headers_to_add", ()), spec.get("response_headers_to_remove", ()))
        self.routes = [Route(r, self, i) for i, r in enumerate(spec.get("routes", ()))]

    def route(self, request: RequestHead) -> Route | None:
        path = request.path
        for route in self.routes:
            prefix = route.plain_prefix
            if prefix is not None:
                if path.startswith(prefix):
                    return route
            elif route.matches(request):
                return route
        return None


class RouteTable:
    """A listener's virtual hosts; picks the virtual host, then the route."""

    def __init__(self, virtual_hosts: Iterable[dict[str, Any]]) -> None:
        self.virtual_hosts = [VirtualHost(v) for v in virtual_hosts]
        self._exact: dict[str, VirtualHost] = {}
        suffixes: list[tuple[str, VirtualHost]] = []
        prefixes: list[tuple[str, VirtualHost]] = []
        self._default: VirtualHost | None = None
        for vhost in self.virtual_hosts:
            for domain in vhost.domains:
                if domain == "*":
                    self._default = vhost
                elif domain.startswith("*"):
                    suffixes.append((domain[1:], vhost))
                elif domain.endswith("*"):
                    prefixes.append((domain[:-1], vhost))
                else:
                    self._exact[domain] = vhost
        # Envoy's order: exact, then the longest suffix wildcard, then the
        # longest prefix wildcard, then "*".
        self._suffixes = sorted(suffixes, key=lambda s: -len(s[0]))
        self._prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
        self._cache: dict[str, VirtualHost | None] = {}

    def virtual_host(self, authority: str) -> VirtualHost | None:
        try:
            return self._cache[authority]
        except KeyError:
            pass
        vhost = self._find_virtual_host(authority.lower())
        if len(self._cache) >= _VHOST_CACHE_LIMIT:
            self._cache.clear()
        self._cache[authority] = vhost
        return vhost

    def _find_virtual_host(self, host: str) -> VirtualHost | None:
        return self.match_virtual_host(host)[0]

    def match_virtual_host(self, authority: str) -> tuple[VirtualHost | None, str, str]:
        """``(virtual host, how, domain)``: the virtual host ``authority``
        selects, how its domain matched (``exact``, ``suffix`` for
        ``*.example.com``, ``prefix`` for ``api.*``, ``wildcard`` for ``*``;
        ``none`` when nothing does) and that domain as configured."""
        host = authority.lower()
        vhost = self._exact.get(host)
        if vhost is not None:
            return vhost, "exact", host
        for suffix, vh in self._suffixes:
            if host.endswith(suffix) and len(host) > len(suffix):
                return vh, "suffix", "*" + suffix
        for prefix, vh in self._prefixes:
            if host.startswith(prefix) and len(host) > len(prefix):
                return vh, "prefix", prefix + "*"
        if self._default is not None:
            return self._default, "wildcard", "*"
        return None, "none", ""

    def route(self, request: RequestHead) -> Route | None:
        vhost = self._cache.get(request.authority)  # virtual_host(), inlined for a cached authority
        if vhost is None:
            vhost = self.virtual_host(request.authority)
        if vhost is None:
            return None
        return vhost.route(request)
