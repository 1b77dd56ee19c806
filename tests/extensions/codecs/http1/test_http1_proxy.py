"""HTTP/1.1 through the real proxy: framing, keep-alive, pipelining, limits,
and what malformed requests get."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time

import aiohttp
import asyncio
import pytest

from support import free_port, http_get, raw_exchange, start_raw

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def simple_config(port: int, upstream_port: int, http_extra: str = "") -> str:
    return f"""
listeners:
  - name: ingress
    address: 127.0.0.1:{port}
    http:
      stat_prefix: ingress
{http_extra}
      filters: [router]
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: backend}}
clusters:
  - name: backend
    endpoints: ["127.0.0.1:{upstream_port}"]
"""


@pytest.fixture
def running(proxy, upstream):
    port = free_port()
    upstream_port, app = upstream
    proc = proxy.start(simple_config(port, upstream_port))
    return proc, port, app


def test_get_is_proxied_with_request_id_and_stats(running):
    proc, port, app = running

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/hello?x=1", headers={"x-custom": "v"}) as resp:
                return resp.status, resp.headers.copy(), await resp.json()

    status, headers, body = asyncio.run(main())
    assert status == 200
    assert body["path"] == "/hello?x=1"
    sent = dict(body["headers"])
    assert sent["x-custom"] == "v"
    assert sent["x-forwarded-proto"] == "http"
    rid = sent["x-request-id"]
    assert len(rid) == 36 and rid[14] == "4"
    assert headers["x-request-id"] == rid
    assert headers["Server"] == "outrider"
    assert proc.wait_stat("http.ingress.downstream_rq_2xx", 1) == 1
    stats = proc.stats()
    assert stats["http.ingress.downstream_rq_total"] == 1
    assert stats["cluster.backend.upstream_rq_total"] == 1
    assert stats["cluster.backend.upstream_rq_2xx"] == 1
    assert stats["cluster.backend.upstream_rq_200"] == 1
    assert stats["listener.127.0.0.1:%d.downstream_cx_total" % port] == 1


def test_keep_alive_reuses_one_upstream_connection(running):
    proc, port, app = running

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for i in range(20):
                async with session.get(f"http://127.0.0.1:{port}/n/{i}") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["path"] == f"/n/{i}"

    asyncio.run(main())
    stats = proc.stats()
    assert stats["cluster.backend.upstream_cx_total"] == 1
    assert stats["http.ingress.downstream_cx_total"] == 1
    assert stats["cluster.backend.upstream_rq_total"] == 20


def test_large_request_body_streams_through(running):
    proc, port, app = running
    payload = bytes(range(256)) * (5 * 4096)  # 5 MiB

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/upload", data=payload) as resp:
                return resp.status, await resp.json()

    status, body = asyncio.run(main())
    assert status == 200
    assert body["body_len"] == len(payload)


def test_large_response_body_streams_through(running):
    proc, port, app = running

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/bytes/{20 * 1024 * 1024}") as resp:
                size = 0
                async for chunk in resp.content.iter_chunked(65536):
                    size += len(chunk)
                return resp.status, size

    assert asyncio.run(main()) == (200, 20 * 1024 * 1024)


@needs_curl
def test_chunked_both_ways_with_curl(running, tmp_path):
    proc, port, app = running
    data = tmp_path / "body"
    data.write_bytes(b"x" * 300_000)
    out = subprocess.run(
        ["curl", "-sS", "-v", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{data}",
         f"http://127.0.0.1:{port}/bytes/100000?chunked=1", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out").read_bytes() == (b"0123456789abcdef" * 6250)[:100000]
    # curl -v shows what it sent as "> ..." and what it received as "< ...":
    # the response itself (the upstream streamed it) must come back chunked.
    response_lines = [line.lower().strip() for line in out.stderr.splitlines() if line.startswith("< ")]
    assert "< transfer-encoding: chunked" in response_lines, response_lines
    assert not any(line.startswith("< content-length:") for line in response_lines)
    received = app["requests"][-1]
    assert received["body_len"] == 300_000
    assert ["transfer-encoding", "chunked"] in received["headers"]


@needs_curl
def test_expect_100_continue(running, tmp_path):
    proc, port, app = running
    data = tmp_path / "body"
    data.write_bytes(b"y" * 50_000)
    out = subprocess.run(
        ["curl", "-sS", "-v", "-H", "Expect: 100-continue", "--data-binary", f"@{data}",
         f"http://127.0.0.1:{port}/expect"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "HTTP/1.1 100 Continue" in out.stderr
    assert json.loads(out.stdout)["body_len"] == 50_000
    # The proxy answered the expectation itself; the upstream never saw it.
    assert "expect" not in dict(app["requests"][-1]["headers"])


def _read_responses(sock: socket.socket, count: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
    """Read ``count`` content-length framed responses from ``sock``."""
    sock.settimeout(timeout)
    buf = b""
    out = []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} responses"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        while len(buf) < length:
            chunk = sock.recv(65536)
            assert chunk
            buf += chunk
        out.append((head.decode(), buf[:length]))
        buf = buf[length:]
    return out


def test_pipelined_requests_are_answered_in_order(running):
    proc, port, app = running
    reqs = b"".join(
        f"GET /p/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5)
    )
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(reqs)
        responses = _read_responses(sock, 5)
    assert [json.loads(body)["path"] for _, body in responses] == [f"/p/{i}" for i in range(5)]


def test_pipelined_requests_wait_for_a_slow_first_one_and_keep_their_bodies(running):
    # The first request is slow at the upstream; the ones behind it (two
    # POSTs with bodies, one length-framed and one chunked) are already in
    # the proxy's buffer, and must be answered after it, in order.
    proc, port, app = running
    reqs = (
        b"GET /delay/0.3 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /post/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nfirst body!"
        b"POST /post/2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nsecond\r\n5\r\n body\r\n0\r\n\r\n"
        b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(reqs)
        responses = _read_responses(sock, 4)
    assert time.monotonic() - started >= 0.3
    assert all(head.startswith("HTTP/1.1 200") for head, _ in responses), [h for h, _ in responses]
    got = [json.loads(body) for _, body in responses]
    assert [(r["method"], r["path"], r["body"]) for r in got] == [
        ("GET", "/delay/0.3", ""),
        ("POST", "/post/1", "first body!"),
        ("POST", "/post/2", "second body"),
        ("GET", "/last", ""),
    ]
    assert [r["path"] for r in app["requests"]] == ["/delay/0.3", "/post/1", "/post/2", "/last"]
    assert proc.stat("http.ingress.downstream_cx_total") == 1


def test_head_has_no_body_and_connection_stays_usable(running):
    proc, port, app = running
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"HEAD /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 1000" in head.lower()
        assert head.endswith(b"\r\n\r\n")  # nothing after the head
        sock.sendall(b"GET /after-head HTTP/1.1\r\nHost: x\r\n\r\n")
        (resp_head, body), = _read_responses(sock, 1)
    assert json.loads(body)["path"] == "/after-head"


def test_http10_client_gets_a_close_delimited_response(running):
    proc, port, app = running
    out = raw_exchange(port, b"GET /bytes/70000?chunked=1 HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert len(body) == 70000


def test_hop_by_hop_headers_are_not_forwarded(running):
    proc, port, app = running
    raw_exchange(
        port,
        b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: close, x-secret\r\nx-secret: 1\r\n"
        b"keep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nte: gzip\r\nx-kept: yes\r\n\r\n",
    )
    sent = dict(app["requests"][-1]["headers"])
    assert sent["x-kept"] == "yes"
    for name in ("x-secret", "keep-alive", "proxy-connection", "te"):
        assert name not in sent


def test_hop_by_hop_response_headers_are_not_forwarded(proxy):
    def answer(data: bytes, transport) -> None:
        transport.write(
            b"HTTP/1.1 200 OK\r\nConnection: x-up-secret\r\nx-up-secret: 1\r\nx-up-kept: 2\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )

    server, upstream_port, _ = start_raw(answer)
    try:
        port = free_port()
        proxy.start(simple_config(port, upstream_port))
        out = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").lower()
    finally:
        server.stop()
    assert out.startswith(b"http/1.1 200")
    assert b"x-up-kept: 2" in out
    assert b"x-up-secret" not in out
    assert out.endswith(b"ok")


def _response_through_proxy(proxy, response: bytes) -> tuple[dict[str, list[str]], bytes]:
    """Proxy one GET to a raw upstream that answers ``response`` (content-length
    framed): the client's header fields (name -> values) and body."""
    server, upstream_port, _ = start_raw(lambda data, transport: transport.write(response))
    try:
        port = free_port()
        proxy.start(simple_config(port, upstream_port))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            (head, body), = _read_responses(sock, 1)
    finally:
        server.stop()
    assert head.startswith("HTTP/1.1 200"), head
    fields: dict[str, list[str]] = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return fields, body


def test_every_hop_by_hop_response_header_is_removed(proxy):
    # The codec README's list: connection, keep-alive, transfer-encoding,
    # upgrade, te other than "trailers", proxy-*, and every header named in
    # Connection. The upstream sends each of them (upgrade on a plain 200);
    # the end-to-end headers next to them must survive unchanged.
    fields, body = _response_through_proxy(proxy, (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: keep-alive, X-Up-Secret, x-other-secret\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authenticate: Basic realm=up\r\n"
        b"Upgrade: h2c\r\n"
        b"TE: gzip\r\n"
        b"X-Up-Secret: 1\r\n"
        b"X-Other-Secret: 2\r\n"
        b"X-Up-Kept: 3\r\n"
        b"Cache-Control: no-store\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    ))
    assert body == b"hello"
    for name in ("connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                 "upgrade", "te", "transfer-encoding", "x-up-secret", "x-other-secret"):
        assert name not in fields, (name, fields)
    assert fields["x-up-kept"] == ["3"]
    assert fields["cache-control"] == ["no-store"]
    assert fields["content-type"] == ["text/plain"]
    assert fields["content-length"] == ["5"]


def test_proxy_auth_fields_are_removed_and_other_proxy_fields_pass(proxy):
    fields, body = _response_through_proxy(proxy, (
        b"HTTP/1.1 200 OK\r\nProxy-Authentication-Info: nextnonce=abc\r\n"
        b"Proxy-Status: cache-1; hit\r\nX-Up-Kept: 3\r\nContent-Length: 2\r\n\r\nok"
    ))
    assert body == b"ok" and fields["x-up-kept"] == ["3"]
    assert "proxy-authentication-info" not in fields, fields
    assert fields["proxy-status"] == ["cache-1; hit"]  # end to end (RFC 9209)


@pytest.mark.parametrize("size", [12, 16 * 1024])
def test_response_head_and_body_read_together_go_out_whole(proxy, size):
    # The head and the body go out together at the end of the loop's batch
    # (one writelines). Either way the client gets the head, then exactly
    # the body, on a connection that stays usable.
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    def answer(data: bytes, transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (size, body))

    server, upstream_port, _ = start_raw(answer)
    try:
        port = free_port()
        proxy.start(simple_config(port, upstream_port))
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        out = raw_exchange(port, request + request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    finally:
        server.stop()
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"content-length: %d" % size in first.lower()
    assert rest[:size] == body
    second, _, rest = rest[size:].partition(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 200") and rest == body


SMUGGLING = {
    "both_content_length_and_transfer_encoding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    "duplicate_content_length": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n"
        b"hello GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    "unsupported_transfer_encoding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        501,
    ),
    "bare_lf": (
        b"GET / HTTP/1.1\nHost: x\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    "bare_cr": (
        b"GET / HTTP/1.1\r\nHost: x\rx-a: b\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    "obs_fold": (
        b"GET / HTTP/1.1\r\nHost: x\r\nx-a: b\r\n c\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    "space_before_colon": (
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    "invalid_chunk_size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"-5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    "chunk_size_with_0x": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0x5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
}


def _exchange_until_close(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool, float]:
    """Send ``data`` on a fresh connection and read until the proxy closes it:
    ``(everything read, closed, seconds until the close or the timeout)``.
    A reset counts as closed."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        closed = False
        deadline = started + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
    return b"".join(chunks), closed, time.monotonic() - started


_REQUEST_LINE = re.compile(rb"(?:^|\r\n)[A-Z]+ \S+ HTTP/1\.[01]\r\n")


@pytest.fixture
def counting_upstream():
    """A raw upstream that answers every request line it reads with a small
    200 right away; yields ``(port, received)``, the bytes it read."""

    def answer(data: bytes, transport) -> None:
        for _ in _REQUEST_LINE.finditer(data):
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    server, port, received = start_raw(answer)
    yield port, received
    server.stop()


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_request_smuggling_shapes_get_an_error_and_a_closed_connection(proxy, counting_upstream, shape):
    upstream_port, upstream_received = counting_upstream
    port = free_port()
    proc = proxy.start(simple_config(port, upstream_port))
    request, status = SMUGGLING[shape]
    out, closed, elapsed = _exchange_until_close(port, request, timeout=5.0)
    assert out.startswith(f"HTTP/1.1 {status}".encode()), out[:200]
    assert out.count(b"HTTP/1.1 ") == 1, "exactly one response, then the connection closes"
    head = out.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\nconnection: close\r\n" in head + b"\r\n", head
    # Closed by the proxy right after the error, not left open until the
    # client gives up.
    assert closed, f"the connection was still open after {elapsed:.1f}s: {out[:200]!r}"
    assert elapsed < 2.0, elapsed
    # At most the first request reached the upstream; never the smuggled one.
    upstream_bytes = b"".join(upstream_received)
    assert len(_REQUEST_LINE.findall(upstream_bytes)) <= 1, upstream_bytes
    assert b"/smuggled" not in upstream_bytes
    assert proc.wait_stat("http.ingress.downstream_cx_protocol_error", 1) >= 1


def test_oversized_headers_get_431(running):
    proc, port, app = running
    big = b"x-big: " + b"a" * (61 * 1024) + b"\r\n"
    out = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(101))
    out = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    assert app["requests"] == []
    assert proc.stat("http.ingress.protocol_error.headers_too_large") == 1
    assert proc.stat("http.ingress.protocol_error.too_many_headers") == 1


def test_max_request_headers_kb_is_configurable(proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proxy.start(simple_config(port, upstream_port, http_extra="      max_request_headers_kb: 1"))
    out = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 1100 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")


def test_slow_request_headers_are_cut_off(proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(simple_config(port, upstream_port, http_extra="      request_headers_timeout: 300ms"))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(5)
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408")
    assert elapsed < 4
    assert proc.stat("http.ingress.downstream_rq_header_timeout") == 1
    assert app["requests"] == []


def test_idle_connection_is_closed(proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(simple_config(port, upstream_port, http_extra="      idle_timeout: 300ms"))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        assert sock.recv(10) == b""
    assert proc.stat("http.ingress.downstream_cx_idle_timeout") == 1


def test_request_timeout_answers_408_when_the_body_stalls(proxy, upstream):
    upstream_port, app = upstream
    port = free_port()
    proc = proxy.start(simple_config(port, upstream_port, http_extra="      request_timeout: 300ms"))
    started = time.monotonic()
    raw = raw_exchange(port, b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab", timeout=5)
    assert raw.startswith(b"HTTP/1.1 408 "), raw
    assert b"connection: close" in raw.lower()
    assert time.monotonic() - started < 3
    assert proc.stat("http.ingress.downstream_rq_timeout") == 1
    # A request that arrives in time is not affected by the timer.
    assert http_get(f"http://127.0.0.1:{port}/fast")[0] == 200
