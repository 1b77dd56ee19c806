"""Routing through the real proxy: virtual hosts, matchers, actions, header
operations, weighted clusters and load balancing."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp
import pytest

from support import free_port


def request(port: int, path: str, host: str = "x", headers: dict | None = None, method: str = "GET"):
    async def main():
        async with aiohttp.ClientSession() as session:
            hdrs = {"Host": host, **(headers or {})}
            async with session.request(method, f"http://127.0.0.1:{port}{path}", headers=hdrs, allow_redirects=False) as resp:
                return resp.status, resp.headers, await resp.read()

    return asyncio.run(main())


@pytest.fixture
def routed(proxy, upstream_pair):
    (a_port, a_app), (b_port, b_app) = upstream_pair
    port = free_port()
    proc = proxy.start(f"""
listeners:
  - name: edge
    address: 127.0.0.1:{port}
    http:
      stat_prefix: edge
      use_remote_address: true
      filters: [router]
      virtual_hosts:
        - name: api
          domains: ["api.example.com", "api.example.com:*"]
          request_headers_to_add: [{{name: x-vhost, value: api}}]
          response_headers_to_add: [{{name: x-vhost-resp, value: api}}]
          routes:
            - match: {{prefix: /v1/, headers: [{{name: x-canary, exact: "1"}}]}}
              route: {{cluster: b}}
            - match: {{prefix: /v1/, query_parameters: [{{name: pick, exact: b}}]}}
              route: {{cluster: b}}
            - match: {{prefix: /v1/}}
              route: {{cluster: a, prefix_rewrite: /}}
              request_headers_to_add: [{{name: x-edge, value: "1"}}]
              request_headers_to_remove: [x-drop-me]
              response_headers_to_remove: [x-upstream]
              response_headers_to_add: [{{name: x-route, value: v1}}]
            - match: {{safe_regex: "^/static/.*\\\\.css$"}}
              route: {{cluster: b, host_rewrite: static.internal}}
            - match: {{path: /exact}}
              route: {{cluster: b}}
        - name: wild-suffix
          domains: ["*.example.org"]
          routes:
            - match: {{prefix: /}}
              direct_response: {{status: 200, body: "suffix\\n"}}
        - name: wild-prefix
          domains: ["internal.*"]
          routes:
            - match: {{prefix: /}}
              direct_response: {{status: 200, body: "prefix\\n"}}
        - name: default
          domains: ["*"]
          routes:
            - match: {{path: /healthz}}
              direct_response: {{status: 200, body: "ok\\n"}}
            - match: {{prefix: /old/}}
              redirect: {{prefix_rewrite: /new/, response_code: 301}}
            - match: {{prefix: /secure}}
              redirect: {{https_redirect: true, response_code: 308}}
            - match: {{prefix: /split}}
              route:
                weighted_clusters: [{{name: a, weight: 1}}, {{name: b, weight: 1}}]
        - name: none
          domains: ["nothing.example.com"]
          routes:
            - match: {{prefix: /only-here}}
              route: {{cluster: a}}
clusters:
  - {{name: a, endpoints: ["127.0.0.1:{a_port}"]}}
  - {{name: b, endpoints: ["127.0.0.1:{b_port}"]}}
""")
    return proc, port, a_app, b_app


def test_virtual_host_by_authority_and_port_wildcard(routed):
    proc, port, a_app, b_app = routed
    status, headers, body = request(port, "/v1/users", host="api.example.com")
    assert status == 200 and json.loads(body)["upstream"] == "a"
    status, headers, body = request(port, "/v1/users", host="api.example.com:8443")
    assert status == 200 and json.loads(body)["upstream"] == "a"
    assert request(port, "/", host="www.example.org")[2] == b"suffix\n"
    assert request(port, "/", host="internal.corp")[2] == b"prefix\n"
    assert request(port, "/healthz", host="anything")[2] == b"ok\n"


def test_header_and_query_matchers_pick_routes_in_order(routed):
    proc, port, a_app, b_app = routed
    assert json.loads(request(port, "/v1/x", host="api.example.com", headers={"x-canary": "1"})[2])["upstream"] == "b"
    assert json.loads(request(port, "/v1/x?pick=b", host="api.example.com")[2])["upstream"] == "b"
    assert json.loads(request(port, "/v1/x?pick=a", host="api.example.com")[2])["upstream"] == "a"


def test_prefix_rewrite_and_header_operations(routed):
    proc, port, a_app, b_app = routed
    status, headers, body = request(
        port, "/v1/users?q=1", host="api.example.com", headers={"x-drop-me": "1", "x-forwarded-for": "10.9.9.9"}
    )
    seen = json.loads(body)
    assert seen["path"] == "/users?q=1"
    sent = dict(seen["headers"])
    assert sent["x-envoy-original-path"] == "/v1/users?q=1"
    assert sent["x-edge"] == "1"
    assert sent["x-vhost"] == "api"
    assert "x-drop-me" not in sent
    assert sent["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert headers["x-route"] == "v1"
    assert headers["x-vhost-resp"] == "api"
    assert "x-upstream" not in headers


def test_regex_route_with_host_rewrite_and_exact_path(routed):
    proc, port, a_app, b_app = routed
    seen = json.loads(request(port, "/static/site.css", host="api.example.com")[2])
    assert seen["upstream"] == "b"
    assert dict(seen["headers"])["host"] == "static.internal"
    assert request(port, "/static/site.js", host="api.example.com")[0] == 404
    assert json.loads(request(port, "/exact?x=1", host="api.example.com")[2])["upstream"] == "b"
    assert request(port, "/exact/more", host="api.example.com")[0] == 404


def test_redirects(routed):
    proc, port, a_app, b_app = routed
    status, headers, _ = request(port, "/old/page?x=1", host="site.test")
    assert status == 301
    assert headers["location"] == "http://site.test/new/page?x=1"
    status, headers, _ = request(port, "/secure/a", host="site.test:8080")
    assert status == 308
    assert headers["location"] == "https://site.test/secure/a"


def test_no_route_is_404_with_a_stat(routed):
    proc, port, a_app, b_app = routed
    assert request(port, "/elsewhere", host="nothing.example.com")[0] == 404
    assert proc.wait_stat("http.edge.no_route", 1) == 1
    assert proc.stat("http.edge.downstream_rq_4xx") == 1


def test_weighted_clusters_split_traffic(routed):
    proc, port, a_app, b_app = routed

    async def main():
        async with aiohttp.ClientSession() as session:
            seen = Counter()
            for _ in range(200):
                async with session.get(f"http://127.0.0.1:{port}/split") as resp:
                    seen[(await resp.json())["upstream"]] += 1
            return seen

    seen = asyncio.run(main())
    assert seen["a"] + seen["b"] == 200
    assert 60 <= seen["a"] <= 140


@pytest.mark.parametrize("policy", ["round_robin", "least_request", "random"])
def test_load_balancers_spread_requests(proxy, upstream_pair, policy):
    (a_port, _), (b_port, _) = upstream_pair
    port = free_port()
    proxy.start(f"""
listeners:
  - name: lb
    address: 127.0.0.1:{port}
    http:
      stat_prefix: lb
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: pair}}
clusters:
  - name: pair
    lb_policy: {policy}
    endpoints: ["127.0.0.1:{a_port}", "127.0.0.1:{b_port}"]
""")

    async def main():
        async with aiohttp.ClientSession() as session:
            order = []
            for _ in range(40):
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    order.append((await resp.json())["upstream"])
            return order

    order = asyncio.run(main())
    counts = Counter(order)
    assert counts["a"] > 5 and counts["b"] > 5
    if policy == "round_robin":
        assert all(order[i] != order[i + 1] for i in range(len(order) - 1))
