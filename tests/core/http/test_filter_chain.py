"""The HTTP filter chain as a stream, through a running proxy.

The filters are a third-party distribution made in the test's temp dir: a
module and its ``.dist-info`` (with the ``outrider`` entry point) on the
proxy's PYTHONPATH, which is how an installed package is found. They hold
and resume both directions, rewrite and swallow body chunks, add trailers,
replace a response, and raise in the response phase.
"""

from __future__ import annotations

import json
import socket
import textwrap
import time
from pathlib import Path

import pytest

from support import echo_app, free_port, start_aiohttp, start_raw

FILTERS = '''
"""Test filters for the chain's streaming contract."""

import asyncio

from outrider import STOP, Extension, HttpFilter, HttpFilterFactory, hookimpl


class Shout(HttpFilter):
    """Upper-cases body chunks both ways and tags the response."""

    def on_request_body(self, chunk, end_stream):
        return chunk.upper()

    def on_response_headers(self, response, end_stream):
        response.headers.append(("x-shout", "seen"))

    def on_response_body(self, chunk, end_stream):
        return chunk.upper()


class Hold(HttpFilter):
    """Holds the request head and the response head for 50 ms each."""

    def on_request_headers(self, request, end_stream):
        asyncio.get_running_loop().call_later(0.05, self.stream.resume_request)
        return STOP

    def on_response_headers(self, response, end_stream):
        response.headers.append(("x-held", "yes"))
        asyncio.get_running_loop().call_later(0.05, self.stream.resume_response)
        return STOP


class Buffer(HttpFilter):
    """Swallows every request chunk and passes the whole body at the end."""

    def __init__(self, stream, config=None):
        super().__init__(stream, config)
        self.parts = []

    def on_request_body(self, chunk, end_stream):
        self.parts.append(chunk)
        return b"".join(self.parts) if end_stream else b""


class Trailers(HttpFilter):
    """Adds a trailer in each direction."""

    def on_request_trailers(self, trailers):
        trailers.append(("x-request-trailer-filter", "1"))

    def on_response_trailers(self, trailers):
        trailers.append(("x-response-trailer-filter", "2"))


class Replace(HttpFilter):
    """Answers 503 itself when the upstream said 418."""

    def on_response_headers(self, response, end_stream):
        if response.status == 418:
            self.stream.send_local_reply(503, "replaced\\n")
            return STOP


class LateReplace(HttpFilter):
    """Holds a 418 and, 50 ms later, answers 503 itself instead."""

    def on_response_headers(self, response, end_stream):
        if response.status == 418:
            asyncio.get_running_loop().call_later(0.05, self.stream.send_local_reply, 503, "replaced later\\n")
            return STOP


class ResponseBoom(HttpFilter):
    """Raises in the response phase when the request had x-resp-boom."""

    boom = False

    def on_request_headers(self, request, end_stream):
        self.boom = request.headers.has("x-resp-boom")

    def on_response_headers(self, response, end_stream):
        if self.boom:
            raise RuntimeError("response-phase kaboom")


FILTERS = {
    "shout": Shout, "hold": Hold, "buffer": Buffer, "trailers": Trailers,
    "replace": Replace, "late_replace": LateReplace, "resp_boom": ResponseBoom,
}


def factory(cls):
    return lambda config, ctx: HttpFilterFactory(cls)


@hookimpl
def outrider_register(registry):
    for name, cls in FILTERS.items():
        registry.add(Extension.from_module(
            __name__, name=name, category="filters.http", factory=factory(cls),
            status="wip", description=cls.__doc__,
        ))
'''


@pytest.fixture(scope="module")
def chain_package(tmp_path_factory) -> Path:
    """A directory holding the ``chainkit`` distribution, for PYTHONPATH."""
    root = tmp_path_factory.mktemp("chainkit")
    (root / "chainkit").mkdir()
    (root / "chainkit" / "__init__.py").write_text(FILTERS)
    (root / "chainkit" / "schema.json").write_text(json.dumps({"type": "object"}))
    (root / "chainkit" / "README.md").write_text("# chainkit\n\nTest filters.\n")
    info = root / "chainkit-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: chainkit\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[outrider]\nchainkit = chainkit\n")
    return root


def config(port: int, filters: list[str], upstream_port: int) -> str:
    return textwrap.dedent(f"""
        listeners:
          - name: chain
            address: 127.0.0.1:{port}
            http:
              stat_prefix: chain
              filters: {json.dumps(filters + ["router"])}
              virtual_hosts:
                - name: all
                  domains: ["*"]
                  routes:
                    - match: {{prefix: /}}
                      route: {{cluster: upstream}}
        clusters:
          - name: upstream
            endpoints: ["127.0.0.1:{upstream_port}"]
        """)


@pytest.fixture
def start_chain(proxy, chain_package):
    def start(filters: list[str], upstream_port: int) -> tuple[object, int]:
        port = free_port()
        proc = proxy.start(config(port, filters, upstream_port), env={"PYTHONPATH": str(chain_package)})
        return proc, port

    return start


def exchange(port: int, request: bytes, until: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request``; read until ``until`` is in the answer (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while until not in data and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_response_phase_exception_gets_a_500_that_skips_the_failed_filter(start_chain, upstream):
    upstream_port, _ = upstream
    proc, port = start_chain(["shout", "resp_boom"], upstream_port)
    answer = exchange(port, b"GET /x HTTP/1.1\r\nHost: h\r\nx-resp-boom: 1\r\n\r\n", b"FILTER\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    # The reply came down from below the failed filter: shout (before it)
    # saw it, once; resp_boom was not entered again.
    assert body == b"INTERNAL ERROR IN FILTER\n"
    assert head.lower().count(b"x-shout: seen") == 1
    assert proc.wait_stat("http.chain.filter_error", 1) == 1
    # Raised once: the failed filter was not entered again with the 500.
    assert proc.output().count("filter 'resp_boom' raised in on_response_headers") == 1
    assert proc.stat("http.chain.filter_error") == 1
    # The worker keeps serving.
    ok = exchange(port, b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n", b"}")
    assert ok.startswith(b"HTTP/1.1 200 ") and b'"PATH": "/Y"' in ok


def test_body_chunks_are_rewritten_both_ways(start_chain, upstream):
    upstream_port, app = upstream
    _, port = start_chain(["shout"], upstream_port)
    request = (
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
    )
    answer = exchange(port, request, b"}")
    assert app["requests"][-1]["body"] == "HELLO WORLD"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(body.lower())["method"] == "post"
    assert body == body.upper() and b'"BODY": "HELLO WORLD"' in body


def test_held_heads_resume_and_what_arrived_meanwhile_follows(start_chain, upstream):
    upstream_port, app = upstream
    _, port = start_chain(["hold"], upstream_port)
    payload = b"x" * 20000
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /held HTTP/1.1\r\nHost: h\r\nContent-Length: 20000\r\n\r\n" + payload[:5000])
        time.sleep(0.01)
        sock.sendall(payload[5000:])  # arrives while the head is held
        data = b""
        while b"}" not in data and time.monotonic() - started < 5:
            data += sock.recv(65536)
        elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 200 ") and b"x-held: yes" in data.lower()
    assert app["requests"][-1]["body_len"] == 20000
    assert elapsed >= 0.1  # both heads were held 50 ms


def test_a_buffering_filter_swallows_chunks_and_passes_the_whole_body(start_chain, upstream):
    upstream_port, app = upstream
    _, port = start_chain(["buffer"], upstream_port)
    chunks = [bytes([65 + i]) * (400 + i) for i in range(8)]  # the echo keeps bodies up to 4 KiB
    request = b"POST /buffered HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    request += b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    answer = exchange(port, request, b"}")
    assert answer.startswith(b"HTTP/1.1 200 ")
    seen = app["requests"][-1]
    assert seen["body_len"] == sum(len(c) for c in chunks)
    assert seen["body"] == b"".join(chunks).decode()


def test_filters_add_trailers_in_both_directions(start_chain):
    received: list[bytes] = []

    def answer(data: bytes, transport) -> None:
        if b"".join(received).endswith(b"\r\n\r\n") and b"0\r\n" in b"".join(received):
            transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4\r\nbody\r\n0\r\ngrpc-status: 0\r\n\r\n"
            )

    server, upstream_port, received = start_raw(answer)
    try:
        _, port = start_chain(["trailers"], upstream_port)
        request = (
            b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nx-client-trailer: c\r\n\r\n"
        )
        reply = exchange(port, request, b"x-response-trailer-filter: 2\r\n\r\n")
        upstream_saw = b"".join(received).lower()
        assert b"3\r\nabc\r\n0\r\n" in upstream_saw
        assert b"x-client-trailer: c\r\n" in upstream_saw and b"x-request-trailer-filter: 1\r\n" in upstream_saw
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        assert body.lower() == b"4\r\nbody\r\n0\r\ngrpc-status: 0\r\nx-response-trailer-filter: 2\r\n\r\n"
    finally:
        server.stop()


def test_a_local_reply_from_the_response_phase_replaces_the_response_once(start_chain, upstream):
    upstream_port, _ = upstream
    proc, port = start_chain(["shout", "replace"], upstream_port)
    answer = exchange(port, b"GET /status/418 HTTP/1.1\r\nHost: h\r\n\r\n", b"REPLACED\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert body == b"REPLACED\n"  # shout, before replace, saw the reply
    assert proc.stat("http.chain.downstream_rq_5xx") == 1
    assert proc.stat("http.chain.filter_error") == 0


def test_a_held_response_replaced_later_by_a_local_reply_is_sent_whole(start_chain, upstream):
    upstream_port, _ = upstream
    proc, port = start_chain(["late_replace"], upstream_port)
    answer = exchange(port, b"GET /status/418 HTTP/1.1\r\nHost: h\r\n\r\n", b"later\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and body == b"replaced later\n"
    # The held 418 was dropped, and the proxy keeps serving.
    ok = exchange(port, b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n", b"}")
    assert ok.startswith(b"HTTP/1.1 200 ")
