"""Routing through the real proxy: virtual hosts, matchers, actions, header
operations, weighted clusters and load balancing."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from support import free_port, http_get, start_aiohttp


def request(port: int, path: str, host: str = "x", headers: dict | None = None, method: str = "GET"):
    async def main():
        async with aiohttp.ClientSession() as session:
            hdrs = {"Host": host, **(headers or {})}
            async with session.request(method, f"http://127.0.0.1:{port}{path}", headers=hdrs, allow_redirects=False) as resp:
                return resp.status, resp.headers, await resp.read()

    return asyncio.run(main())


def start_lb_proxy(proxy, cluster_yaml: str):
    """A proxy sending every request to the one cluster ``pair``, whose
    settings (lb_policy, endpoints) are ``cluster_yaml``; returns it and its
    listener port."""
    port = free_port()
    proc = proxy.start(f"""
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
""" + cluster_yaml.strip("\n") + "\n")
    return proc, port


def upstream_order(port: int, n: int) -> list[str]:
    """The upstream that answered each of ``n`` sequential requests."""

    async def main():
        async with aiohttp.ClientSession() as session:
            order = []
            for _ in range(n):
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    order.append((await resp.json())["upstream"])
            return order

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
    _, port = start_lb_proxy(proxy, f"""
    lb_policy: {policy}
    endpoints: ["127.0.0.1:{a_port}", "127.0.0.1:{b_port}"]
""")

    order = upstream_order(port, 40)
    counts = Counter(order)
    assert counts["a"] > 5 and counts["b"] > 5
    if policy == "round_robin":
        assert all(order[i] != order[i + 1] for i in range(len(order) - 1))


# ------------------------------------------- endpoint weights, in-flight load


def test_endpoint_weights_drive_weighted_round_robin(proxy, upstream_pair):
    (a_port, _), (b_port, _) = upstream_pair
    proc, port = start_lb_proxy(proxy, f"""
    lb_policy: round_robin
    endpoints:
      - {{address: "127.0.0.1:{a_port}", weight: 3}}
      - {{address: "127.0.0.1:{b_port}", weight: 1}}
""")
    status, body = http_get(f"{proc.admin}/clusters?format=json")
    assert status == 200
    (cluster,) = json.loads(body)["cluster_statuses"]
    assert {h["address"]: h["weight"] for h in cluster["host_statuses"]} == {
        f"127.0.0.1:{a_port}": 3,
        f"127.0.0.1:{b_port}": 1,
    }

    order = upstream_order(port, 40)
    # Weighted round robin is a fixed schedule of period 3 + 1 = 4: exact
    # proportions over the run and in every period, not just on average.
    assert Counter(order) == {"a": 30, "b": 10}
    for start in range(0, 40, 4):
        assert Counter(order[start : start + 4]) == {"a": 3, "b": 1}, order


def gated_app(name: str, gate: threading.Event) -> web.Application:
    """An upstream whose ``/hold`` answers only once ``gate`` is set (10 s at
    most); every other path answers at once. Both report the upstream's name."""
    app = web.Application()

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/hold":
            await asyncio.to_thread(gate.wait, 10)
        return web.json_response({"upstream": name, "path": request.path})

    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
def gated_pair():
    gate = threading.Event()
    servers, ports = [], []
    for name in ("a", "b"):
        server, port = start_aiohttp(gated_app(name, gate))
        servers.append(server)
        ports.append(port)
    yield gate, ports
    gate.set()
    for server in servers:
        server.stop()


def test_least_request_avoids_the_host_with_a_request_in_flight(proxy, gated_pair):
    gate, (a_port, b_port) = gated_pair
    names = {f"127.0.0.1:{a_port}": "a", f"127.0.0.1:{b_port}": "b"}
    proc, port = start_lb_proxy(proxy, f"""
    lb_policy: {{name: least_request, config: {{choice_count: 2}}}}
    endpoints: ["127.0.0.1:{a_port}", "127.0.0.1:{b_port}"]
""")

    async def rq_active(session) -> dict[str, int]:
        async with session.get(f"{proc.admin}/clusters?format=json") as resp:
            (cluster,) = (await resp.json())["cluster_statuses"]
        return {names[h["address"]]: h["stats"]["rq_active"] for h in cluster["host_statuses"]}

    async def wait_active(session, total: int) -> dict[str, int]:
        deadline = time.monotonic() + 5
        active = await rq_active(session)
        while sum(active.values()) != total and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            active = await rq_active(session)
        return active

    async def fetch_held(session):
        async with session.get(f"http://127.0.0.1:{port}/hold") as resp:
            return resp.status, await resp.json()

    async def main():
        async with aiohttp.ClientSession() as session:
            held = asyncio.create_task(fetch_held(session))
            try:
                during = await wait_active(session, 1)
                busy = next((name for name, n in during.items() if n == 1), None)
                # With two hosts and two distinct choices both are compared on
                # every request: the idle one must win every time.
                picked = []
                for _ in range(10):
                    async with session.get(f"http://127.0.0.1:{port}/fast") as resp:
                        picked.append((await resp.json())["upstream"])
                still = await rq_active(session)
            finally:
                gate.set()
            held_status, held_body = await asyncio.wait_for(held, 10)
            after = await wait_active(session, 0)
            return during, busy, picked, still, held_status, held_body, after

    during, busy, picked, still, held_status, held_body, after = asyncio.run(main())
    assert busy is not None and sorted(during.values()) == [0, 1], during
    idle = "b" if busy == "a" else "a"
    assert picked == [idle] * 10
    assert still == during  # the fast requests were counted out again
    assert held_status == 200 and held_body["upstream"] == busy
    assert after == {"a": 0, "b": 0}
    assert proc.stat("cluster.pair.upstream_rq_active") == 0
    assert proc.stat("cluster.pair.upstream_rq_total") == 11


# ------------------------------------------ virtual host vs route header ops


def test_virtual_host_header_operations_and_their_order_with_the_route(proxy, upstream_pair):
    """core/http/routing.py: a request gets the virtual host's operations and
    then the route's; a response the route's and then the virtual host's.
    Within one level, removals come before additions."""
    (a_port, _), _ = upstream_pair
    port = free_port()
    proxy.start(f"""
listeners:
  - name: edge
    address: 127.0.0.1:{port}
    http:
      stat_prefix: edge
      virtual_hosts:
        - name: vh
          domains: ["*"]
          request_headers_to_add:
            - {{name: x-vh-only, value: vh}}
            - {{name: x-both, value: vh}}
            - {{name: x-route-removes, value: vh}}
            - {{name: x-replaced, value: vh}}
          request_headers_to_remove: [x-client-drop, x-vh-removes]
          response_headers_to_add:
            - {{name: x-vh-resp, value: vh}}
            - {{name: x-both-resp, value: vh}}
            - {{name: x-route-removes-resp, value: vh}}
            - {{name: x-vh-replaces-resp, value: vh, append: false}}
          response_headers_to_remove: [x-upstream, x-vh-removes-resp]
          routes:
            - match: {{prefix: /direct}}
              direct_response: {{status: 200, body: "direct\\n"}}
            - match: {{prefix: /}}
              route: {{cluster: a}}
              request_headers_to_add:
                - {{name: x-both, value: route}}
                - {{name: x-vh-removes, value: route}}
                - {{name: x-replaced, value: route, append: false}}
              request_headers_to_remove: [x-route-removes]
              response_headers_to_add:
                - {{name: x-both-resp, value: route}}
                - {{name: x-vh-removes-resp, value: route}}
                - {{name: x-vh-replaces-resp, value: route}}
              response_headers_to_remove: [x-route-removes-resp]
clusters:
  - {{name: a, endpoints: ["127.0.0.1:{a_port}"]}}
""")

    async def main():
        async with aiohttp.ClientSession() as session:
            client_headers = {"x-client-drop": "1", "x-vh-removes": "client", "x-replaced": "client", "x-keep": "1"}
            async with session.get(f"http://127.0.0.1:{port}/api", headers=client_headers) as resp:
                proxied = resp.status, resp.headers.copy(), await resp.json()
            async with session.get(f"http://127.0.0.1:{port}/direct") as resp:
                direct = resp.status, resp.headers.copy(), await resp.read()
            return proxied, direct

    (status, headers, seen), (d_status, d_headers, d_body) = asyncio.run(main())
    assert status == 200 and seen["upstream"] == "a"

    def sent(name: str) -> list[str]:
        return [v for k, v in seen["headers"] if k == name]

    # Request: virtual host first, then route.
    assert sent("x-keep") == ["1"]
    assert sent("x-client-drop") == []  # the virtual host's removal
    assert sent("x-vh-only") == ["vh"]  # the virtual host's addition
    assert sent("x-both") == ["vh", "route"]  # both append, in that order
    assert sent("x-route-removes") == []  # the route's removal runs after the vhost's add
    assert sent("x-vh-removes") == ["route"]  # the vhost's removal ran before the route's add
    assert sent("x-replaced") == ["route"]  # append: false on the route replaces client's and vhost's

    # Response: route first, then virtual host.
    assert "x-upstream" not in headers  # the upstream's header, removed by the virtual host
    assert headers.getall("x-vh-resp") == ["vh"]
    assert headers.getall("x-both-resp") == ["route", "vh"]
    assert "x-vh-removes-resp" not in headers  # the vhost's removal runs after the route's add
    assert headers.getall("x-route-removes-resp") == ["vh"]  # the route's removal ran before the vhost's add
    assert headers.getall("x-vh-replaces-resp") == ["vh"]  # append: false on the vhost replaces the route's

    # A direct response of the virtual host gets its response headers too.
    assert (d_status, d_body) == (200, b"direct\n")
    assert d_headers.getall("x-vh-resp") == ["vh"]
    assert d_headers.getall("x-both-resp") == ["vh"]
