"""The router against real upstreams that fail in the ways upstreams do."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from support import free_port, raw_exchange, start_raw


def config(port: int, endpoints: list[str], route_extra: str = "", cluster_extra: str = "") -> str:
    eps = ", ".join(f'"{e}"' for e in endpoints)
    return f"""
listeners:
  - name: ingress
    address: 127.0.0.1:{port}
    http:
      stat_prefix: ingress
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: backend{route_extra}}}
clusters:
  - name: backend
    endpoints: [{eps}]
{cluster_extra}
"""


def get(port: int, path: str = "/", headers: dict | None = None) -> tuple[int, dict, bytes]:
    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers or {}) as resp:
                return resp.status, resp.headers.copy(), await resp.read()

    return asyncio.run(main())


def test_unreachable_endpoint_gets_503(proxy):
    port = free_port()
    dead = free_port()
    proc = proxy.start(config(port, [f"127.0.0.1:{dead}"]))
    status, _, body = get(port)
    assert status == 503
    assert b"connect" in body
    assert proc.stat("cluster.backend.upstream_cx_connect_fail") == 1
    assert proc.wait_stat("http.ingress.downstream_rq_5xx", 1) == 1
    assert "connect to 127.0.0.1:%d failed" % dead in proc.output()


def test_connect_failure_is_retried_on_another_host(proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    dead = free_port()
    proc = proxy.start(config(
        port, [f"127.0.0.1:{dead}", f"127.0.0.1:{upstream_port}"],
        route_extra=", retry_policy: {retry_on: [connect-failure], num_retries: 2}",
    ))
    for _ in range(4):
        status, _, _ = get(port)
        assert status == 200
    assert proc.stat("cluster.backend.upstream_rq_retry") >= 1
    assert proc.stat("cluster.backend.upstream_rq_retry_success") >= 1


def test_5xx_is_retried_and_the_retry_answer_is_returned(proxy, upstream):
    upstream_port, app = upstream
    calls = []

    def flaky(data: bytes, transport) -> None:
        calls.append(data)
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")

    server, flaky_port, _ = start_raw(flaky)
    try:
        port = free_port()
        proc = proxy.start(config(
            port, [f"127.0.0.1:{flaky_port}", f"127.0.0.1:{upstream_port}"],
            route_extra=", retry_policy: {retry_on: [5xx], num_retries: 1}",
        ))
        status, headers, body = get(port, "/first")
        assert status == 200, body
        assert json.loads(body)["path"] == "/first"
        assert len(calls) == 1
        assert proc.stat("cluster.backend.upstream_rq_retry") == 1
        assert proc.stat("cluster.backend.upstream_rq_503") == 1
    finally:
        server.stop()


def test_upstream_timeout_gets_504(proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], route_extra=", timeout: 300ms"))
    started = time.monotonic()
    status, _, body = get(port, "/delay/3")
    assert status == 504
    assert time.monotonic() - started < 2.5
    assert proc.stat("cluster.backend.upstream_rq_timeout") == 1
    # The proxy still serves afterwards.
    assert get(port, "/ok")[0] == 200


def test_upstream_reset_before_response_gets_502(proxy):
    def reset(data: bytes, transport) -> None:
        transport.abort()

    server, upstream_port, received = start_raw(reset)
    try:
        port = free_port()
        proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"]))
        status, _, body = get(port)
        assert status == 502
        assert received, "the upstream saw the request"
        assert proc.stat("cluster.backend.upstream_rq_rx_reset") == 1
    finally:
        server.stop()


@pytest.mark.parametrize(
    "response",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    ],
)
def test_malformed_upstream_response_gets_502(proxy, response):
    def answer(data: bytes, transport) -> None:
        transport.write(response)

    server, upstream_port, _ = start_raw(answer)
    try:
        port = free_port()
        proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"]))
        status, _, _ = get(port)
        assert status == 502
        assert proc.stat("cluster.backend.upstream_cx_protocol_error") == 1
    finally:
        server.stop()


def test_malformed_body_after_response_head_resets_the_client(proxy):
    # The head was valid and may already be on its way: the only honest
    # answer left is to cut the client's connection, never a 200 that ends.
    def answer(data: bytes, transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")

    server, upstream_port, _ = start_raw(answer)
    try:
        port = free_port()
        proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"]))
        raw = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not raw.endswith(b"0\r\n\r\n"), raw
        assert proc.stat("cluster.backend.upstream_cx_protocol_error") == 1
        assert proc.stat("http.ingress.downstream_rq_tx_reset") == 1
    finally:
        server.stop()


def test_upstream_that_lies_about_length_truncates_and_closes(proxy):
    def answer(data: bytes, transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        transport.close()

    server, upstream_port, _ = start_raw(answer)
    try:
        port = free_port()
        proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"]))
        out = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert body == b"only ten b"  # then the connection closed: the client knows it is short
        assert proc.stat("cluster.backend.upstream_rq_rx_reset") == 1
        assert proc.stat("http.ingress.downstream_rq_tx_reset") == 1
    finally:
        server.stop()


def test_pending_overflow_gets_503(proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(config(
        port, [f"127.0.0.1:{upstream_port}"],
        cluster_extra="    circuit_breakers: {max_connections: 1, max_pending_requests: 1}",
    ))

    async def main():
        async with aiohttp.ClientSession() as session:
            async def one(i):
                async with session.get(f"http://127.0.0.1:{port}/delay/0.5") as resp:
                    return resp.status
            return await asyncio.gather(*(one(i) for i in range(4)))

    statuses = asyncio.run(main())
    assert 503 in statuses and 200 in statuses
    assert proc.stat("cluster.backend.upstream_rq_pending_overflow") >= 1


def test_pending_overflow_is_not_retried(proxy, upstream):
    # As in Envoy: a full pending queue answers 503 UO at once; another try
    # would only queue again, so a retry policy does not apply to it.
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(config(
        port, [f"127.0.0.1:{upstream_port}"],
        route_extra=", retry_policy: {retry_on: [5xx, reset, connect-failure], num_retries: 3}",
        cluster_extra="    circuit_breakers: {max_connections: 1, max_pending_requests: 1}",
    ))

    async def main():
        async with aiohttp.ClientSession() as session:
            async def one(i):
                async with session.get(f"http://127.0.0.1:{port}/delay/0.5") as resp:
                    return resp.status
            return await asyncio.gather(*(one(i) for i in range(4)))

    statuses = asyncio.run(main())
    assert 503 in statuses and 200 in statuses
    stats = proc.stats()
    assert stats["cluster.backend.upstream_rq_pending_overflow"] == statuses.count(503)
    assert stats.get("cluster.backend.upstream_rq_retry", 0) == 0
    assert stats.get("cluster.backend.upstream_rq_retry_limit_exceeded", 0) == 0


def test_upstream_connections_close_after_idle_timeout(proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"], cluster_extra="    idle_timeout: 200ms"))
    assert get(port)[0] == 200
    assert proc.stat("cluster.backend.upstream_cx_active") == 1
    deadline = time.monotonic() + 5
    while proc.stat("cluster.backend.upstream_cx_active") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.stat("cluster.backend.upstream_cx_active") == 0
    assert proc.stat("cluster.backend.upstream_cx_idle_timeout") == 1


def test_bodyless_responses_keep_the_upstream_connection_and_count_nothing_cancelled(proxy, upstream):
    # 204 and HEAD responses end with their head: the stream finishes inside
    # the upstream callback, which must neither drop the pooled connection
    # nor count the finished request as cancelled.
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(port, [f"127.0.0.1:{upstream_port}"]))

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for i in range(4):
                async with session.get(f"http://127.0.0.1:{port}/status/204") as resp:
                    assert resp.status == 204
                async with session.head(f"http://127.0.0.1:{port}/head/{i}") as resp:
                    assert resp.status == 200

    asyncio.run(main())
    stats = proc.stats()
    assert stats["cluster.backend.upstream_rq_total"] == 8
    assert stats["cluster.backend.upstream_cx_total"] == 1
    assert stats["cluster.backend.upstream_rq_cancelled"] == 0


def concurrent_statuses(port: int, paths: list[str]) -> list[int]:
    async def main():
        async with aiohttp.ClientSession() as session:
            async def one(path):
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    await resp.read()
                    return resp.status
            return await asyncio.gather(*(one(p) for p in paths))

    return asyncio.run(main())


def test_max_requests_circuit_breaker_answers_503_uo(proxy, upstream):
    upstream_port, _ = upstream
    port = free_port()
    proc = proxy.start(config(
        port, [f"127.0.0.1:{upstream_port}"], cluster_extra="    circuit_breakers: {max_requests: 2}",
    ))
    statuses = concurrent_statuses(port, ["/delay/0.5"] * 4)
    assert sorted(statuses) == [200, 200, 503, 503]
    assert proc.stat("cluster.backend.upstream_rq_pending_overflow") == 2
    assert proc.stat("cluster.backend.upstream_rq_total") == 2
    # Once the two finish, the breaker closes again.
    assert get(port, "/after")[0] == 200


def test_max_retries_circuit_breaker_limits_retries_in_flight(proxy):
    def busy(data: bytes, transport) -> None:
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")

    server, busy_port, _ = start_raw(busy)
    try:
        port = free_port()
        proc = proxy.start(config(
            port, [f"127.0.0.1:{busy_port}"],
            route_extra=", retry_policy: {retry_on: [5xx], num_retries: 3}",
            cluster_extra="    circuit_breakers: {max_retries: 0}",
        ))
        status, _, body = get(port, "/")
        assert (status, body) == (503, b"busy")
        assert proc.stat("cluster.backend.upstream_rq_retry") == 0
        assert proc.stat("cluster.backend.upstream_rq_retry_overflow") == 1
        assert proc.stat("cluster.backend.upstream_rq_total") == 1
    finally:
        server.stop()


def test_per_try_timeout_retries_a_stalled_attempt_then_gives_504(proxy, upstream):
    upstream_port, _ = upstream
    stalled = []

    def stall(data: bytes, transport) -> None:
        stalled.append(data)  # never answers

    server, stall_port, _ = start_raw(stall)
    try:
        port = free_port()
        # Round robin starts with the stalled host; its attempt times out
        # after 300ms and the retry goes to the healthy one.
        proc = proxy.start(config(
            port, [f"127.0.0.1:{stall_port}", f"127.0.0.1:{upstream_port}"],
            route_extra=", timeout: 5s, retry_policy: {retry_on: [5xx], num_retries: 1, per_try_timeout: 300ms}",
        ))
        started = time.monotonic()
        status, _, body = get(port, "/retried")
        assert status == 200 and json.loads(body)["path"] == "/retried"
        assert 0.25 < time.monotonic() - started < 3
        assert len(stalled) == 1
        assert proc.stat("cluster.backend.upstream_rq_per_try_timeout") == 1
        assert proc.stat("cluster.backend.upstream_rq_retry") == 1
    finally:
        server.stop()

    # Without a retry left, a stalled attempt is a 504 after per_try_timeout.
    server, stall_port, _ = start_raw(stall)
    try:
        port = free_port()
        proc = proxy.start(config(
            port, [f"127.0.0.1:{stall_port}"],
            route_extra=", timeout: 5s, retry_policy: {retry_on: [connect-failure], num_retries: 1, per_try_timeout: 300ms}",
        ))
        started = time.monotonic()
        status, _, _ = get(port, "/stalled")
        assert status == 504
        assert time.monotonic() - started < 3
        assert proc.stat("cluster.backend.upstream_rq_per_try_timeout") == 1
    finally:
        server.stop()
