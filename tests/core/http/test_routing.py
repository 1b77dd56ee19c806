"""RouteTable on its own: virtual host selection order and route matching."""

from __future__ import annotations

from outrider.http.message import Headers, RequestHead
from outrider.http.routing import RouteTable


def req(path: str, authority: str = "x", method: str = "GET", **headers: str) -> RequestHead:
    return RequestHead(method, path, authority, Headers((k.replace("_", "-"), v) for k, v in headers.items()))


def table(*vhosts):
    return RouteTable(vhosts)


def vhost(name, domains, *routes):
    return {"name": name, "domains": domains, "routes": list(routes) or [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}


def test_virtual_host_precedence_exact_suffix_prefix_default():
    t = table(
        vhost("default", ["*"]),
        vhost("prefix", ["foo.*"]),
        vhost("short-suffix", ["*.com"]),
        vhost("long-suffix", ["*.example.com"]),
        vhost("exact", ["foo.example.com"]),
    )
    assert t.virtual_host("foo.example.com").name == "exact"
    assert t.virtual_host("FOO.example.com").name == "exact"
    assert t.virtual_host("bar.example.com").name == "long-suffix"
    assert t.virtual_host("bar.com").name == "short-suffix"
    assert t.virtual_host("foo.org").name == "prefix"
    assert t.virtual_host("other").name == "default"


def test_port_in_authority_needs_a_port_aware_domain():
    t = table(vhost("plain", ["api.test"]), vhost("any-port", ["api.test:*"]))
    assert t.virtual_host("api.test").name == "plain"
    assert t.virtual_host("api.test:8080").name == "any-port"
    assert table(vhost("plain", ["api.test"])).virtual_host("api.test:8080") is None


def test_routes_first_match_wins_and_matcher_kinds():
    t = table(vhost("v", ["*"],
        {"name": "hdr", "match": {"prefix": "/a", "headers": [{"name": "x-v", "exact": "2"}]}, "route": {"cluster": "c2"}},
        {"name": "inv", "match": {"prefix": "/a", "headers": [{"name": "x-block", "present": True, "invert_match": True}]}, "route": {"cluster": "c1"}},
        {"name": "exact", "match": {"path": "/b"}, "route": {"cluster": "c3"}},
        {"name": "regex", "match": {"safe_regex": "/r/[0-9]+"}, "route": {"cluster": "c4"}},
        {"name": "query", "match": {"prefix": "/q", "query_parameters": [{"name": "k", "prefix": "v"}]}, "route": {"cluster": "c5"}},
        {"name": "ci", "match": {"prefix": "/CI", "case_sensitive": False}, "route": {"cluster": "c6"}},
        {"name": "method", "match": {"prefix": "/m", "headers": [{"name": ":method", "exact": "POST"}]}, "route": {"cluster": "c7"}},
    ))
    assert t.route(req("/a", x_v="2")).name == "hdr"
    assert t.route(req("/a")).name == "inv"
    assert t.route(req("/a", x_block="1")) is None
    assert t.route(req("/b?x=1")).name == "exact"
    assert t.route(req("/bb")) is None
    assert t.route(req("/r/123")).name == "regex"
    assert t.route(req("/r/12a")) is None
    assert t.route(req("/q?k=value")).name == "query"
    assert t.route(req("/q?k=x")) is None
    assert t.route(req("/ci/x")).name == "ci"
    assert t.route(req("/m", method="POST")).name == "method"
    assert t.route(req("/m")) is None


def test_why_not_explains_a_miss():
    t = table(vhost("v", ["*"], {"match": {"prefix": "/a", "headers": [{"name": "x-v", "exact": "2"}]}, "route": {"cluster": "c"}}))
    route = t.virtual_hosts[0].routes[0]
    assert "prefix '/a'" in route.why_not(req("/b"))
    assert "x-v" in route.why_not(req("/a"))
    assert route.why_not(req("/a", x_v="2")) is None


def test_weighted_clusters_follow_weights():
    t = table(vhost("v", ["*"], {"match": {"prefix": "/"}, "route": {"weighted_clusters": [{"name": "a", "weight": 9}, {"name": "b", "weight": 1}]}}))
    route = t.route(req("/"))
    picks = [route.pick_cluster() for _ in range(5000)]
    share = picks.count("a") / len(picks)
    assert 0.85 < share < 0.95


def test_redirect_locations():
    t = table(vhost("v", ["*"],
        {"match": {"prefix": "/old/"}, "redirect": {"prefix_rewrite": "/new/"}},
        {"match": {"prefix": "/h"}, "redirect": {"host_redirect": "other.test", "strip_query": True, "response_code": 302}},
        {"match": {"prefix": "/s"}, "redirect": {"https_redirect": True, "port_redirect": 8443}},
    ))
    r = req("/old/a?x=1", authority="site.test:81")
    assert t.route(r).redirect.location(r, t.route(r)) == "http://site.test:81/new/a?x=1"
    r = req("/h/p?x=1", authority="site.test")
    route = t.route(r)
    assert route.redirect.status == 302
    assert route.redirect.location(r, route) == "http://other.test/h/p"
    r = req("/s", authority="site.test:80")
    assert t.route(r).redirect.location(r, t.route(r)) == "https://site.test:8443/s"
