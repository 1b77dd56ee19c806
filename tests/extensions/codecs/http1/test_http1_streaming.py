"""HTTP/1.1 bodies through the real proxy: streamed under flow control (a
slow reader holds the writer back, and the proxy never holds a whole body)
and trailers carried end to end in both directions.

The upstreams are raw asyncio servers in a background thread
(``ThreadedServer``) that speak just enough HTTP/1.1 for the test; the
clients are blocking sockets with timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from typing import Any, Callable

import pytest

from support import chunk_at, connect_socket, free_port, rss_bytes, serve_protocol

# Many times what the proxy may hold per stream (transport write buffers of
# 64 KiB, the 1 MiB per-connection buffer limit), and than the kernel buffers
# on the way: a proxy that soaked the body up would show in its RSS.
BIG = 48 * 1024 * 1024
CHUNK = 64 * 1024
# The proxy's RSS may grow by this much while a transfer is held back
# (about 1 MiB in practice; far below BIG).
RSS_SLACK = 8 * 1024 * 1024


def http_config(port: int, upstream_port: int) -> str:
    return f"""
listeners:
  - name: ingress
    address: 127.0.0.1:{port}
    http:
      stat_prefix: ingress
      filters: [router]
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: backend, timeout: 60s}}
clusters:
  - name: backend
    endpoints: ["127.0.0.1:{upstream_port}"]
"""






def wait_until_still(progress: Callable[[], int], still: float = 0.25, limit: float = 3.0) -> int:
    """Poll ``progress()`` until it has not moved for ``still`` seconds (or
    ``limit`` passed); return its value. The writer is then held back (or
    done, which the caller's bound on the value tells apart)."""
    deadline = time.monotonic() + limit
    last = progress()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            break
    return last


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head (without its CRLFCRLF) and the bytes read past it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def header_values(head: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            out.append(value.strip())
    return out


def read_chunked(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """Decode a chunked body whose first bytes are ``buf``: ``(body, trailer
    block)``; the trailer block is the raw field lines, b"" when none."""
    body = bytearray()

    def fill(n: int) -> None:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a chunked body"
            buf += chunk

    def line() -> bytes:
        nonlocal buf
        while b"\r\n" not in buf:
            fill(len(buf) + 1)
        text, _, buf = buf.partition(b"\r\n")
        return text

    while True:
        size = int(line().split(b";")[0], 16)
        if size == 0:
            break
        fill(size + 2)
        body += buf[:size]
        assert buf[size:size + 2] == b"\r\n", "chunk data not followed by CRLF"
        buf = buf[size + 2:]
    trailers = []
    while True:
        field = line()
        if not field:
            break
        trailers.append(field)
    assert buf == b"", f"bytes after the chunked body: {buf[:100]!r}"
    return bytes(body), b"\r\n".join(trailers)


# -- a large download to a slow client ---------------------------------------


class Download(asyncio.Protocol):
    """Answers a GET with ``total`` bytes (content-length framed), written as
    fast as the connection takes them (it honours pause_writing).
    ``state["sent"]`` is how far it got, ``state["digest"]`` the hash."""

    def __init__(self, total: int, base: bytes, state: dict[str, Any]) -> None:
        self.total = total
        self.base = base
        self.state = state
        self.paused = False
        self.started = False
        self.sent = 0
        self.index = 0
        self.digest = hashlib.sha256()
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.started and b"\r\n\r\n" in self.buf:
            self.started = True
            self.state["request"] = self.buf
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.total)
            self.pump()

    def pump(self) -> None:
        while not self.paused and self.sent < self.total:
            chunk = chunk_at(self.index, self.base)
            self.index += 1
            self.digest.update(chunk)
            self.sent += len(chunk)
            self.state["sent"] = self.sent
            self.transport.write(chunk)  # may call pause_writing
        if self.sent >= self.total and "digest" not in self.state:
            self.state["digest"] = self.digest.hexdigest()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()


def test_large_download_to_a_slow_reader_is_intact_and_bounded(proxy):
    base = os.urandom(CHUNK)
    state: dict[str, Any] = {"sent": 0}
    server, upstream_port = serve_protocol(lambda: Download(BIG, base, state), sndbuf=CHUNK)
    try:
        port = free_port()
        proc = proxy.start(http_config(port, upstream_port))
        before = rss_bytes(proc.proc.pid)
        with connect_socket(port, rcvbuf=CHUNK) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            head, rest = read_head(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert header_values(head, b"content-length") == [str(BIG).encode()]
            # The client stops reading: the upstream must be held back, and
            # the proxy must not soak up the rest of the body meanwhile.
            stalled_sent = wait_until_still(lambda: state["sent"])
            grown = rss_bytes(proc.proc.pid) - before
            digest = hashlib.sha256(rest)
            received = len(rest)
            deadline = time.monotonic() + 30
            while received < BIG and time.monotonic() < deadline:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                received += len(chunk)
        assert stalled_sent < BIG // 2, f"the upstream sent {stalled_sent} of {BIG} bytes to a stalled client"
        assert grown < RSS_SLACK, f"the proxy's RSS grew by {grown} bytes"
        assert received == BIG
        assert digest.hexdigest() == state["digest"]
        assert proc.wait_stat("http.ingress.downstream_rq_2xx", 1) == 1
        assert proc.stat("cluster.backend.upstream_cx_rx_bytes_total") > BIG
    finally:
        server.stop()


# -- a large upload to a slow upstream ---------------------------------------


class Upload(asyncio.Protocol):
    """Reads nothing until the test calls :meth:`resume`; then reads a
    content-length framed request, hashes its body and answers the hex
    digest and the byte count."""

    def __init__(self, conns: list["Upload"]) -> None:
        conns.append(self)
        self.buf = b""
        self.remaining: int | None = None
        self.count = 0
        self.digest = hashlib.sha256()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.pause_reading()

    def resume(self) -> None:
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.remaining is None:
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            head, _, data = self.buf.partition(b"\r\n\r\n")
            lengths = header_values(head, b"content-length")
            assert len(lengths) == 1, head
            self.remaining = int(lengths[0])
        data = data[: self.remaining]
        self.digest.update(data)
        self.count += len(data)
        self.remaining -= len(data)
        if self.remaining == 0:
            answer = f"{self.digest.hexdigest()} {self.count}".encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(answer), answer))


def test_large_upload_to_a_slow_upstream_is_intact_and_bounded(proxy):
    conns: list[Upload] = []
    server, upstream_port = serve_protocol(lambda: Upload(conns), rcvbuf=CHUNK)
    try:
        port = free_port()
        proc = proxy.start(http_config(port, upstream_port))
        before = rss_bytes(proc.proc.pid)
        base = os.urandom(CHUNK)
        sent = {"n": 0}
        digest = hashlib.sha256()
        sock = connect_socket(port, timeout=30.0, sndbuf=CHUNK)
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n" % BIG)

        def send_all() -> None:
            try:
                for i in range(BIG // CHUNK):
                    chunk = chunk_at(i, base)
                    digest.update(chunk)
                    sock.sendall(chunk)
                    sent["n"] += len(chunk)
            except OSError:  # the test fails on the count below
                pass

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        try:
            # The upstream reads nothing yet: the client must be held back,
            # and the proxy must not soak up the body meanwhile.
            stalled_sent = wait_until_still(lambda: sent["n"])
            grown = rss_bytes(proc.proc.pid) - before
            assert len(conns) == 1
            server.call(conns[0].resume)
            sender.join(30)
            assert not sender.is_alive()
            assert sent["n"] == BIG
            head, rest = read_head(sock)
            while len(rest) < 64 + 1 + len(str(BIG)):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
        finally:
            sock.close()
        assert stalled_sent < BIG // 2, f"the client sent {stalled_sent} of {BIG} bytes to a stalled upstream"
        assert grown < RSS_SLACK, f"the proxy's RSS grew by {grown} bytes"
        assert head.startswith(b"HTTP/1.1 200"), head
        assert rest.decode() == f"{digest.hexdigest()} {BIG}"
        assert proc.stat("http.ingress.downstream_cx_rx_bytes_total") > BIG
    finally:
        server.stop()


# -- trailers ------------------------------------------------------------------


class Recorder(asyncio.Protocol):
    """Records what it reads; once a whole request has arrived (``done``
    decides), answers ``response``."""

    def __init__(self, received: list[bytes], done: Callable[[bytes], bool], response: bytes) -> None:
        self.received = received
        self.done = done
        self.response = response
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.done(self.buf):
            self.received.append(self.buf)
            self.buf = b""
            self.transport.write(self.response)


def _chunked_request_done(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    return bool(sep) and (body.startswith(b"0\r\n") or b"\r\n0\r\n" in body) and body.endswith(b"\r\n\r\n")


def test_request_trailers_reach_the_upstream(proxy):
    received: list[bytes] = []
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    server, upstream_port = serve_protocol(lambda: Recorder(received, _chunked_request_done, ok))
    try:
        port = free_port()
        proxy.start(http_config(port, upstream_port))
        with connect_socket(port, timeout=5.0) as sock:
            sock.sendall(
                b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\nx-count: 2\r\n\r\n"
            )
            head, rest = read_head(sock)
            while len(rest) < 2:
                chunk = sock.recv(65536)
                assert chunk
                rest += chunk
        assert head.startswith(b"HTTP/1.1 200") and rest == b"ok"
    finally:
        server.stop()
    assert len(received) == 1
    up_head, _, up_body = received[0].partition(b"\r\n\r\n")
    assert up_head.startswith(b"POST /up HTTP/1.1\r\n")
    assert header_values(up_head, b"transfer-encoding") == [b"chunked"]
    # The body is re-chunked (chunk sizes may differ), and ends with the
    # last chunk followed by the client's trailer fields.
    body, trailers = read_chunked(_NoSocket(), up_body)
    assert body == b"hello world"
    fields = [line.lower() for line in trailers.split(b"\r\n")]
    assert b"x-checksum: abc123" in fields
    assert b"x-count: 2" in fields


class _NoSocket:
    """For :func:`read_chunked` over bytes already read: nothing more comes."""

    def recv(self, n: int) -> bytes:
        return b""


def test_response_trailers_reach_the_client(proxy):
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
        b"4\r\nabcd\r\n3\r\nefg\r\n0\r\nx-checksum: 7\r\nx-status: done\r\n\r\n"
    )
    received: list[bytes] = []
    server, upstream_port = serve_protocol(lambda: Recorder(received, lambda b: b"\r\n\r\n" in b, response))
    try:
        port = free_port()
        proc = proxy.start(http_config(port, upstream_port))
        with connect_socket(port, timeout=5.0) as sock:
            sock.sendall(b"GET /down HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
            head, rest = read_head(sock)
            body, trailers = read_chunked(sock, rest)
            # The connection is still usable after a response with trailers.
            sock.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            head2, rest2 = read_head(sock)
            body2, _ = read_chunked(sock, rest2)
    finally:
        server.stop()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert header_values(head, b"transfer-encoding") == [b"chunked"]
    assert body == b"abcdefg"
    fields = [line.lower() for line in trailers.split(b"\r\n")]
    assert b"x-checksum: 7" in fields
    assert b"x-status: done" in fields
    assert head2.startswith(b"HTTP/1.1 200") and body2 == b"abcdefg"
    assert len(received) == 2
    assert proc.wait_stat("http.ingress.downstream_rq_2xx", 2) == 2


# -- a response streamed without a length ---------------------------------------


class Streamer(asyncio.Protocol):
    """Answers a request head with a response head and then ``pieces``, a
    few milliseconds apart: chunk-framed when ``chunked``, else delimited by
    closing the connection (no content-length either way)."""

    def __init__(self, pieces: list[bytes], chunked: bool) -> None:
        self.pieces = pieces
        self.chunked = chunked
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        self.buf = b""
        framing = b"Transfer-Encoding: chunked\r\n" if self.chunked else b"Connection: close\r\n"
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + framing + b"\r\n")
        loop = asyncio.get_running_loop()
        for i, piece in enumerate(self.pieces):
            loop.call_later(0.01 * (i + 1), self.transport.write, b"%x\r\n%b\r\n" % (len(piece), piece) if self.chunked else piece)
        loop.call_later(0.01 * (len(self.pieces) + 1), self.finish)

    def finish(self) -> None:
        if self.chunked:
            self.transport.write(b"0\r\n\r\n")
        else:
            self.transport.close()


@pytest.mark.parametrize("upstream_framing", ["chunked", "close_delimited"])
def test_response_without_length_reaches_an_http11_client_chunked(proxy, upstream_framing):
    pieces = [os.urandom(n) for n in (1, 70_000, 333, 200_000)]
    server, upstream_port = serve_protocol(lambda: Streamer(pieces, upstream_framing == "chunked"))
    try:
        port = free_port()
        proxy.start(http_config(port, upstream_port))
        with connect_socket(port, timeout=5.0) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            head, rest = read_head(sock)
            body, trailers = read_chunked(sock, rest)
            # Chunked framing ended the body, so the connection stays usable.
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            head2, rest2 = read_head(sock)
            body2, _ = read_chunked(sock, rest2)
    finally:
        server.stop()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert header_values(head, b"transfer-encoding") == [b"chunked"]
    assert header_values(head, b"content-length") == []
    assert header_values(head, b"connection") == []
    assert header_values(head, b"content-type") == [b"application/octet-stream"]
    assert body == b"".join(pieces)
    assert trailers == b""
    assert head2.startswith(b"HTTP/1.1 200") and body2 == body


# -- a pause that outlives its stream -----------------------------------------


class Downloads(asyncio.Protocol):
    """Answers each request on the connection with the next of ``sizes``
    bytes, as fast as the connection takes them; ``state["sent"][i]`` is how
    far response ``i`` got."""

    def __init__(self, sizes: list[int], base: bytes, state: dict[str, Any]) -> None:
        self.sizes = sizes
        self.base = base
        self.state = state
        self.paused = False
        self.buf = b""
        self.current = -1
        self.left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.next()

    def next(self) -> None:
        if self.left or b"\r\n\r\n" not in self.buf or self.current + 1 >= len(self.sizes):
            return
        _, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.current += 1
        self.left = self.sizes[self.current]
        self.state["sent"].append(0)
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.left)
        self.pump()

    def pump(self) -> None:
        while not self.paused and self.left:
            chunk = self.base[: min(len(self.base), self.left)]
            self.left -= len(chunk)
            self.state["sent"][self.current] += len(chunk)
            self.transport.write(chunk)
        if not self.left:
            self.next()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()


def test_a_client_still_behind_when_its_next_response_starts_holds_that_one_back_too(proxy):
    # A client that reads slowly pipelines a second GET once the first
    # response has left the upstream but not yet reached it: the proxy's
    # write buffer to the client is still above its high-water mark. The
    # second response starts in that state and must be held back from the
    # start, not read whole into the proxy's memory.
    first = 16 * 1024 * 1024  # more than the kernel buffers hold on the way
    state: dict[str, Any] = {"sent": []}
    server, upstream_port = serve_protocol(lambda: Downloads([first, BIG], os.urandom(CHUNK), state), sndbuf=CHUNK)
    try:
        port = free_port()
        proc = proxy.start(http_config(port, upstream_port))
        before = rss_bytes(proc.proc.pid)
        with connect_socket(port, rcvbuf=CHUNK) as sock:
            sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
            read = 0
            deadline = time.monotonic() + 20
            # Read a little at a time until the upstream has sent all of the
            # first response, then stop reading.
            while not (state["sent"] and state["sent"][0] == first) and time.monotonic() < deadline:
                chunk = sock.recv(16 * 1024)
                if not chunk:
                    break
                read += len(chunk)
                time.sleep(0.001)
            assert state["sent"][0] == first and read < first, (state, read)
            time.sleep(0.1)  # the first stream is over; the proxy is still waiting to write its tail
            sock.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined behind it
            stalled = wait_until_still(lambda: state["sent"][1] if len(state["sent"]) > 1 else 0)
            grown = rss_bytes(proc.proc.pid) - before
        assert stalled < BIG // 2, f"the upstream sent {stalled} of {BIG} bytes of the second response to a stalled client"
        assert grown < RSS_SLACK, f"the proxy's RSS grew by {grown} bytes"
    finally:
        server.stop()
