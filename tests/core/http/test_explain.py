"""Explainability through a real proxy: the per-request debug header
(``http.debug``) and the admin's ``/route`` endpoint, on a multi-vhost
config with real upstreams and real clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.parse

import aiohttp
import pytest
from aiohttp import web

from outrider.http.conn_manager import HttpStats
from outrider.http.debug import DebugPolicy
from outrider.stats import StatsStore
from support import echo_app, free_port, http_get, start_aiohttp

DEBUG = "x-outrider-debug"


def request(port: int, path: str, host: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    async def main():
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            hdrs = {"Host": host, **(headers or {})}
            async with session.get(f"http://127.0.0.1:{port}{path}", headers=hdrs, allow_redirects=False) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()

    return asyncio.run(main())


def parse_debug(value: str) -> dict[str, str]:
    """``k=v; k=v`` → dict (the documented format)."""
    fields = {}
    for item in value.split("; "):
        key, sep, val = item.partition("=")
        assert sep and key not in fields, value
        fields[key] = val
    return fields


def flaky_app() -> web.Application:
    """Answers 503 to the first request, then echoes like echo_app."""
    app = echo_app("flaky")
    app["calls"] = 0  # noqa

    @web.middleware
    async def fail_first(req: web.Request, handler):
        req.app["calls"] += 1
        if req.app["calls"] == 1:
            await req.read()
            req.app["requests"].append({"path": req.path_qs, "headers": [[k.lower(), v] for k, v in req.headers.items()]})
            return web.Response(status=503, text="try again\n")
        return await handler(req)

    app.middlewares.append(fail_first)
    return app


@pytest.fixture
def flaky():
    app = flaky_app()
    server, port = start_aiohttp(app)
    yield port, app
    server.stop()


CONFIG = """
listeners:
  - name: edge
    address: 127.0.0.1:{edge}
    http:
      stat_prefix: edge
      debug: {{header: X-Outrider-Debug, allow_from: [127.0.0.0/8, "::1/128"]}}
      virtual_hosts:
        - name: api
          domains: ["api.example.com", "api.example.com:*"]
          request_headers_to_add: [{{name: x-vhost, value: api}}]
          routes:
            - name: canary
              match: {{prefix: /v1/, headers: [{{name: x-canary, exact: "1"}}]}}
              route: {{cluster: b}}
            - name: pick-b
              match: {{prefix: /v1/, query_parameters: [{{name: pick, exact: b}}]}}
              route: {{cluster: b}}
            - name: v1
              match: {{prefix: /v1/}}
              route:
                weighted_clusters: [{{name: a, weight: 3}}, {{name: b, weight: 1}}]
                prefix_rewrite: /
                timeout: 7s
                retry_policy: {{retry_on: [5xx, reset], num_retries: 2, per_try_timeout: 2s}}
              request_headers_to_add: [{{name: x-edge, value: "1"}}]
              request_headers_to_remove: [x-drop-me]
              response_headers_to_remove: [x-upstream]
            - name: flaky
              match: {{path: /flaky}}
              route: {{cluster: flaky, retry_policy: {{retry_on: [5xx], num_retries: 1}}}}
        - name: static
          domains: ["*.example.org"]
          routes:
            - name: css
              match: {{safe_regex: "^/assets/[a-z]+\\\\.css$"}}
              route: {{cluster: a, host_rewrite: static.internal}}
            - name: rest
              match: {{prefix: /}}
              direct_response: {{status: 404, body: "not a stylesheet\\n"}}
        - name: internal
          domains: ["internal.*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: b}}
        - name: default
          domains: ["*"]
          routes:
            - name: health
              match: {{path: /healthz}}
              direct_response: {{status: 200, body: "ok\\n", headers: [{{name: x-health, value: yes}}]}}
            - name: old
              match: {{prefix: /old/}}
              redirect: {{prefix_rewrite: /new/, response_code: 301}}
            - name: secure
              match: {{prefix: /secure}}
              redirect: {{https_redirect: true, response_code: 308}}
            - name: catchall
              match: {{prefix: /}}
              route: {{cluster: a}}
  - name: locked
    address: 127.0.0.1:{locked}
    http:
      stat_prefix: locked
      debug: {{allow_from: [10.0.0.0/8, "fd00::/8"]}}
      virtual_hosts:
        - name: only
          domains: ["locked.example.com"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: a}}
  - name: db
    address: 127.0.0.1:{db}
    tcp: {{cluster: a}}
clusters:
  - {{name: a, endpoints: ["127.0.0.1:{a}"]}}
  - {{name: b, endpoints: ["127.0.0.1:{b}"]}}
  - {{name: flaky, endpoints: ["127.0.0.1:{flaky}"]}}
"""


@pytest.fixture
def explained(proxy, upstream_pair, flaky):
    (a_port, a_app), (b_port, b_app) = upstream_pair
    flaky_port, flaky_app_ = flaky
    edge, locked, db = free_port(), free_port(), free_port()
    proc = proxy.start(CONFIG.format(edge=edge, locked=locked, db=db, a=a_port, b=b_port, flaky=flaky_port))
    return {
        "proc": proc, "edge": edge, "locked": locked,
        "a": (a_port, a_app), "b": (b_port, b_app), "flaky": (flaky_port, flaky_app_),
    }


def upstream_saw(app: web.Application) -> list[dict]:
    return list(app["requests"])


def header_names(record: dict) -> set[str]:
    return {name for name, _ in record["headers"]}


# -- the debug header ------------------------------------------------------------


def test_debug_header_reports_vhost_route_cluster_upstream_and_timings(explained):
    edge = explained["edge"]
    b_port, b_app = explained["b"]
    status, headers, body = request(edge, "/v1/users", "api.example.com", {"x-canary": "1", DEBUG: "1"})
    assert status == 200 and json.loads(body)["upstream"] == "b"
    info = parse_debug(headers[DEBUG])
    assert info["vhost"] == "api"
    assert info["route"] == "canary"
    assert info["cluster"] == "b"
    assert info["upstream"] == f"127.0.0.1:{b_port}"
    assert info["attempts"] == "1"
    assert info["cx"] in ("pooled", "waited")
    timings = [float(info[k]) for k in ("route_ms", "connect_ms", "first_byte_ms", "total_ms")]
    assert all(t >= 0 for t in timings)
    assert timings == sorted(timings), info  # a timeline since the request head arrived
    assert list(info) == [
        "vhost", "route", "cluster", "upstream", "attempts", "cx", "route_ms", "connect_ms", "first_byte_ms", "total_ms",
    ]
    # The request header never reaches the upstream, and the debug information
    # goes only to the client.
    (seen,) = upstream_saw(b_app)
    assert DEBUG not in header_names(seen)
    assert explained["proc"].wait_stat("http.edge.debug_allowed", 1) == 1
    assert explained["proc"].stat("http.edge.debug_denied") == 0

    # Without the header: no debug information, even from an allowed address.
    status, headers, _ = request(edge, "/v1/users", "api.example.com", {"x-canary": "1"})
    assert status == 200 and DEBUG not in headers


def test_debug_header_on_local_answers_and_a_miss(explained):
    edge = explained["edge"]
    status, headers, body = request(edge, "/healthz", "anything", {DEBUG: "yes"})
    assert (status, body) == (200, b"ok\n")
    info = parse_debug(headers[DEBUG])
    assert (info["vhost"], info["route"], info["details"]) == ("default", "health", "direct_response")
    assert "cluster" not in info and "upstream" not in info and "attempts" not in info and "connect_ms" not in info
    assert float(info["route_ms"]) <= float(info["total_ms"])

    status, headers, _ = request(edge, "/nothing-here", "api.example.com", {DEBUG: "1"})
    assert status == 404
    info = parse_debug(headers[DEBUG])
    assert (info["vhost"], info["route"], info["flags"], info["details"]) == ("api", "-", "NR", "route_not_found")

    status, headers, _ = request(edge, "/old/a?x=1", "www.test", {DEBUG: "1"})
    assert status == 301 and headers["location"] == "http://www.test/new/a?x=1"
    assert parse_debug(headers[DEBUG])["route"] == "old"


def test_debug_header_counts_attempts_across_a_retry(explained):
    edge = explained["edge"]
    flaky_port, flaky_app_ = explained["flaky"]
    status, headers, body = request(edge, "/flaky", "api.example.com", {DEBUG: "1"})
    assert status == 200 and json.loads(body)["upstream"] == "flaky"
    info = parse_debug(headers[DEBUG])
    assert (info["route"], info["cluster"], info["upstream"], info["attempts"]) == (
        "flaky", "flaky", f"127.0.0.1:{flaky_port}", "2",
    )
    assert float(info["connect_ms"]) <= float(info["first_byte_ms"]) <= float(info["total_ms"])
    seen = upstream_saw(flaky_app_)
    assert len(seen) == 2 and all(DEBUG not in header_names(r) for r in seen)


def test_debug_header_from_outside_allow_from_gets_nothing_and_a_stat(explained):
    proc, locked = explained["proc"], explained["locked"]
    a_port, a_app = explained["a"]
    status, headers, body = request(locked, "/x", "locked.example.com", {DEBUG: "1", "x-other": "kept"})
    assert status == 200
    assert DEBUG not in headers
    (seen,) = upstream_saw(a_app)
    assert DEBUG not in header_names(seen)  # removed whether honoured or not
    assert "x-other" in header_names(seen)
    assert proc.wait_stat("http.locked.debug_denied", 1) == 1
    assert proc.stat("http.locked.debug_allowed") == 0
    # A request without the header is neither allowed nor denied.
    request(locked, "/y", "locked.example.com")
    assert proc.stat("http.locked.debug_denied") == 1


def test_upstream_cannot_forge_the_debug_header(explained, proxy):
    """An upstream's own x-outrider-debug is replaced by the proxy's."""
    async def forged(req: web.Request) -> web.Response:
        return web.Response(text="hi\n", headers={DEBUG: "vhost=forged"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", forged)
    server, port = start_aiohttp(app)
    try:
        listen = free_port()
        proxy.start(f"""
listeners:
  - name: l
    address: 127.0.0.1:{listen}
    http:
      stat_prefix: l
      debug: {{allow_from: [127.0.0.1/32]}}
      virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: f}}}}]}}]
clusters:
  - {{name: f, endpoints: ["127.0.0.1:{port}"]}}
""")
        _, headers, _ = request(listen, "/", "x", {DEBUG: "1"})
        assert parse_debug(headers[DEBUG])["vhost"] == "v"
    finally:
        server.stop()


def test_without_a_debug_block_the_debug_header_gets_nothing(proxy, upstream):
    """The header is off unless configured: a listener with no ``debug:``
    block answers a request that asks for it (from loopback, which any
    allow_from would let in) without debug information, counts nothing,
    and leaves the request header alone."""
    upstream_port, app = upstream
    listen = free_port()
    proc = proxy.start(f"""
listeners:
  - name: plain
    address: 127.0.0.1:{listen}
    http:
      stat_prefix: plain
      virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: c}}}}]}}]
clusters:
  - {{name: c, endpoints: ["127.0.0.1:{upstream_port}"]}}
""")
    for name in (DEBUG, "X-Outrider-Debug"):
        status, headers, body = request(listen, "/asks", "x", {name: "1"})
        assert status == 200 and json.loads(body)["path"] == "/asks"
        assert DEBUG not in headers
    status, headers, _ = request(listen, "/nowhere-special", "x", {DEBUG: "1"})
    assert DEBUG not in headers
    # Nothing looked at it: it went up as it came, and no debug stat moved.
    assert [dict(r["headers"]).get(DEBUG) for r in upstream_saw(app)] == ["1", "1", "1"]
    stats = proc.stats()
    assert stats.get("http.plain.debug_allowed", 0) == 0 and stats.get("http.plain.debug_denied", 0) == 0
    assert stats["http.plain.downstream_rq_2xx"] == 3


def test_allow_from_matching_ipv4_ipv6_and_mapped_addresses():
    hcm = type("HCM", (), {})()
    hcm.stats = HttpStats(StatsStore().scope("http.t"))
    policy = DebugPolicy({"allow_from": ["127.0.0.0/8", "2001:db8::/32", "10.1.2.3"]}, hcm)  # type: ignore[arg-type]
    assert policy.header == "x-outrider-debug"
    assert policy.allows("127.0.0.1") and policy.allows("127.255.0.9") and policy.allows("10.1.2.3")
    assert policy.allows("2001:db8::1") and policy.allows("::ffff:127.0.0.1")
    assert policy.allows("2001:db8::1%eth0")
    assert not policy.allows("10.1.2.4") and not policy.allows("::1") and not policy.allows("2001:db9::1")
    assert not policy.allows("") and not policy.allows("garbage")
    assert policy.allows("127.0.0.1") and not policy.allows("10.1.2.4")  # the cached decisions
    hcm.listener_name = "l"
    with pytest.raises(ValueError, match="debug.header 'x debug' is not a valid header name"):
        DebugPolicy({"header": "x debug", "allow_from": ["127.0.0.0/8"]}, hcm)  # type: ignore[arg-type]


def test_bad_allow_from_fails_validation(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listeners:\n  - name: l\n    address: 127.0.0.1:1\n    http:\n      stat_prefix: l\n"
        "      debug: {allow_from: [10.0.0.300/8]}\n      virtual_hosts: []\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "outrider", "validate", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "debug.allow_from[0]" in result.stdout + result.stderr
    assert "10.0.0.300/8" in result.stdout + result.stderr


# -- /route -------------------------------------------------------------------------


def explain(proc, **params) -> tuple[int, object]:
    items = []
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            items.append((key, v))
    status, body = http_get(f"{proc.admin}/route?{urllib.parse.urlencode(items)}")
    if status == 200:
        return status, json.loads(body)
    return status, body


def test_route_header_matcher_and_weighted_clusters_with_rewrites(explained):
    proc = explained["proc"]
    status, ans = explain(proc, authority="api.example.com", path="/v1/users?q=1", header=["x-canary:1"])
    assert status == 200, ans
    assert ans["listener"] == "edge"
    assert ans["virtual_host"] == {
        "name": "api", "match": "exact", "domain": "api.example.com", "domains": ["api.example.com", "api.example.com:*"],
    }
    assert ans["route"]["name"] == "canary" and ans["route"]["index"] == 0
    assert ans["not_matched"] == []
    assert ans["action"] == {"type": "cluster", "cluster": "b"}
    assert ans["rewrites"]["path"] is None and ans["rewrites"]["host"] is None
    assert ans["timeout"] == 15.0 and ans["retry_policy"] is None

    # Without the canary header, and with x-canary: 2, the weighted route wins.
    for headers, got in (([], "no such header"), (["x-canary:2", "x-drop-me:1"], "'2'")):
        status, ans = explain(proc, authority="API.example.com:8443", path="/v1/users?q=1", header=headers)
        assert status == 200, ans
        assert ans["virtual_host"]["match"] == "prefix" and ans["virtual_host"]["domain"] == "api.example.com:*"
        assert ans["route"]["name"] == "v1" and ans["route"]["index"] == 2
        reasons = [(r["name"], r["reason"]) for r in ans["not_matched"]]
        assert reasons == [
            ("canary", f"header matcher on 'x-canary' does not match: wanted exact '1', got {got}"),
            ("pick-b", "query parameter matcher on 'pick' does not match: wanted exact 'b', got no such parameter"),
        ]
        assert ans["action"] == {
            "type": "weighted_clusters", "total_weight": 4,
            "clusters": [{"name": "a", "weight": 3, "percent": 75.0}, {"name": "b", "weight": 1, "percent": 25.0}],
        }
        rw = ans["rewrites"]
        assert rw["path"] == {"prefix": "/v1/", "prefix_rewrite": "/", "from": "/v1/users?q=1", "to": "/users?q=1"}
        assert rw["request_headers_to_add"] == [
            {"name": "x-vhost", "value": "api", "append": True, "from": "virtual_host"},
            {"name": "x-edge", "value": "1", "append": True, "from": "route"},
        ]
        assert rw["request_headers_to_remove"] == [{"name": "x-drop-me", "from": "route"}]
        assert rw["response_headers_to_remove"] == [{"name": "x-upstream", "from": "route"}]
        up = ans["upstream_request"]
        assert up["path"] == "/users?q=1" and up["authority"] == "API.example.com:8443"
        sent = [tuple(h) for h in up["headers"]]
        assert ("x-vhost", "api") in sent and ("x-edge", "1") in sent
        assert ("x-envoy-original-path", "/v1/users?q=1") in sent
        assert all(name != "x-drop-me" for name, _ in sent)
        assert ans["timeout"] == 7.0
        assert ans["retry_policy"]["retry_on"] == ["5xx", "reset"] and ans["retry_policy"]["num_retries"] == 2
        assert ans["retry_policy"]["per_try_timeout"] == 2.0

    # The query string in the path feeds the query parameter matchers.
    status, ans = explain(proc, authority="api.example.com", path="/v1/x?pick=b")
    assert ans["route"]["name"] == "pick-b" and ans["action"] == {"type": "cluster", "cluster": "b"}
    status, ans = explain(proc, authority="api.example.com", path="/v1/x?pick=c")
    assert ans["not_matched"][1]["reason"] == "query parameter matcher on 'pick' does not match: wanted exact 'b', got 'c'"


def test_route_regex_suffix_wildcard_and_host_rewrite(explained):
    proc = explained["proc"]
    status, ans = explain(proc, authority="cdn.example.org", path="/assets/site.css")
    assert status == 200, ans
    assert ans["virtual_host"]["name"] == "static"
    assert (ans["virtual_host"]["match"], ans["virtual_host"]["domain"]) == ("suffix", "*.example.org")
    assert ans["route"]["name"] == "css" and ans["route"]["match"]["safe_regex"] == "^/assets/[a-z]+\\.css$"
    assert ans["rewrites"]["host"] == {"from": "cdn.example.org", "to": "static.internal"}
    assert ans["upstream_request"]["authority"] == "static.internal"

    status, ans = explain(proc, authority="cdn.example.org", path="/assets/site.js?v=1")
    assert ans["route"]["name"] == "rest"
    assert ans["not_matched"] == [{
        "index": 0, "name": "css", "match": ans["not_matched"][0]["match"],
        "reason": "safe_regex '^/assets/[a-z]+\\\\.css$' does not match path '/assets/site.js'",
    }]
    assert ans["action"] == {"type": "direct_response", "status": 404, "body": "not a stylesheet\n", "headers": []}

    status, ans = explain(proc, authority="internal.corp", path="/")
    assert (ans["virtual_host"]["name"], ans["virtual_host"]["match"], ans["virtual_host"]["domain"]) == (
        "internal", "prefix", "internal.*",
    )
    assert ans["route"]["name"] == "internal/0"


def test_route_redirect_direct_response_and_misses(explained):
    proc = explained["proc"]
    status, ans = explain(proc, authority="www.test", path="/old/a/b?x=1")
    assert status == 200, ans
    assert (ans["virtual_host"]["match"], ans["virtual_host"]["domain"]) == ("wildcard", "*")
    assert ans["route"]["name"] == "old"
    assert ans["action"] == {"type": "redirect", "status": 301, "location": "http://www.test/new/a/b?x=1"}
    assert [(r["name"], r["reason"]) for r in ans["not_matched"]] == [
        ("health", "path '/healthz' does not match path '/old/a/b'"),
    ]
    assert "redirected with 301 to http://www.test/new/a/b?x=1" in ans["summary"]

    status, ans = explain(proc, authority="www.test:8080", path="/secure/x")
    assert ans["action"] == {"type": "redirect", "status": 308, "location": "https://www.test/secure/x"}
    status, ans = explain(proc, authority="www.test", path="/secure/x", scheme="https")
    assert ans["action"]["location"] == "https://www.test/secure/x"

    status, ans = explain(proc, authority="www.test", path="/healthz", method="HEAD")
    assert ans["request"]["method"] == "HEAD"
    assert ans["action"] == {
        "type": "direct_response", "status": 200, "body": "ok\n", "headers": [{"name": "x-health", "value": "yes"}],
    }

    # No route in the virtual host: every route says why.
    status, ans = explain(proc, authority="api.example.com", path="/v2/x")
    assert ans["route"] is None
    assert ans["action"]["type"] == "no_route" and ans["action"]["status"] == 404
    assert [r["name"] for r in ans["not_matched"]] == ["canary", "pick-b", "v1", "flaky"]
    assert ans["not_matched"][3]["reason"] == "path '/flaky' does not match path '/v2/x'"

    # No virtual host at all (the locked listener has no "*").
    status, ans = explain(proc, authority="elsewhere", path="/", listener="locked")
    assert ans["listener"] == "locked"
    assert ans["virtual_host"] is None and ans["route"] is None
    assert ans["action"]["type"] == "no_route"
    assert "locked.example.com" in ans["summary"]
    status, ans = explain(proc, authority="locked.example.com", path="/", listener="locked")
    assert ans["virtual_host"]["name"] == "only" and ans["action"] == {"type": "cluster", "cluster": "a"}


def test_route_agrees_with_the_debug_header(explained):
    proc, edge = explained["proc"], explained["edge"]
    cases = [
        ("api.example.com", "/v1/a", {"x-canary": "1"}),
        ("api.example.com", "/v1/a?pick=b", {}),
        ("cdn.example.org", "/assets/a.css", {}),
        ("cdn.example.org", "/assets/a.js", {}),
        ("www.test", "/healthz", {}),
        ("www.test", "/elsewhere", {}),
    ]
    for host, path, headers in cases:
        _, ans = explain(proc, authority=host, path=path, header=[f"{k}:{v}" for k, v in headers.items()])
        _, got, _ = request(edge, path, host, {**headers, DEBUG: "1"})
        info = parse_debug(got[DEBUG])
        assert (info["vhost"], info["route"]) == (ans["virtual_host"]["name"], ans["route"]["name"]), (host, path)
        if ans["action"]["type"] == "cluster":
            assert info["cluster"] == ans["action"]["cluster"]


def test_route_sends_nothing_upstream(explained):
    proc = explained["proc"]
    for path in ("/v1/a", "/flaky", "/"):
        assert explain(proc, authority="api.example.com", path=path)[0] == 200
        assert explain(proc, authority="www.test", path=path)[0] == 200
    for name in ("a", "b", "flaky"):
        assert upstream_saw(explained[name][1]) == []
    assert proc.stat("cluster.a.upstream_rq_total") == 0
    assert proc.stat("http.edge.downstream_rq_total") == 0


@pytest.mark.parametrize(
    "query, message",
    [
        ("path=/x", "give the request's authority"),
        ("authority=a", "give the request's path"),
        ("authority=a&path=x", "must start with '/'"),
        ("authority=a&path=/x&header=nocolon", "write header=NAME:VALUE"),
        ("authority=a&path=/x&header=bad%20name:1", "not a valid header name"),
        ("authority=a&path=/x&header=:method:GET", "pseudo-headers"),
        ("authority=a&path=/x&header=host:b", "authority parameter"),
        ("authority=a&path=/x&method=G%20T", "not an HTTP method"),
        ("authority=a&path=/x&scheme=ftp", "use http or https"),
        ("authority=a&path=/x&bogus=1", "unknown parameter 'bogus'"),
        ("authority=a&path=/x&path=/y", "'path' given 2 times"),
        ("authority=a%2Fb&path=/x", "not a host or host:port"),
        ("authority=a&path=/x&listener=nope", "no listener named 'nope' (HTTP listeners: edge, locked)"),
        ("authority=a&path=/x&listener=db", "'db' is not an HTTP listener (HTTP listeners: edge, locked)"),
        ("authority=a&path=/x&listener=edge&listener=locked", "'listener' given 2 times"),
    ],
)
def test_route_bad_parameters_are_400(explained, query, message):
    status, body = http_get(f"{explained['proc'].admin}/route?{query}")
    assert status == 400, body
    assert body.startswith("/route: ") and message in body, body


def test_route_is_listed_in_the_admin_index(explained):
    status, body = http_get(f"{explained['proc'].admin}/")
    assert status == 200 and "/route" in body
