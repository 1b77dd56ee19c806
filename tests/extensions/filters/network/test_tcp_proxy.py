"""tcp_proxy through the real proxy process, against real upstream servers.

Every upstream here is an asyncio server on its own loop in a background
thread (``ThreadedServer``); clients are plain blocking sockets with timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import pytest

from support import chunk_at, connect_socket, free_port, rss_bytes, serve_protocol, wait_for

# Big enough that the proxy holding it in memory would show: several times
# the proxy's own write buffer limit (1 MiB) plus what the kernel buffers.
BIG = 64 * 1024 * 1024
CHUNK = 64 * 1024


# -- upstream servers ----------------------------------------------------------



class Echo(asyncio.Protocol):
    """Echoes what it reads; on EOF answers ``<eof>`` and closes. Records
    ``made``, ``eof`` and ``lost`` in ``events``."""

    def __init__(self, events: list[str], greeting: bytes = b"") -> None:
        self.events = events
        self.greeting = greeting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.events.append("made")
        if self.greeting:
            self.transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        if data == b"reset":
            # SO_LINGER 0 turns the close into a RST.
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.transport.write(b"<eof>")
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")


@pytest.fixture
def echo_upstream():
    """``(port, events)`` of a raw TCP echo server."""
    events: list[str] = []
    server, port = serve_protocol(lambda: Echo(events))
    yield port, events
    server.stop()


# -- proxy config and clients ----------------------------------------------------


def tcp_config(port: int, endpoints: list[str], tcp_extra: str = "", idle: str = "1s", cluster_extra: str = "") -> str:
    eps = ", ".join(f'"{e}"' for e in endpoints)
    return f"""
listeners:
  - name: pg
    address: 127.0.0.1:{port}
    tcp: {{cluster: echo, idle_timeout: {idle}{tcp_extra}}}
clusters:
  - name: echo
    endpoints: [{eps}]
{cluster_extra}
"""



def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer if the peer closed first (the socket's timeout bounds each recv)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def read_to_close(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything until the peer closes: ``(data, closed)``; a reset counts as closed."""
    sock.settimeout(timeout)
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(buf), True
        except socket.timeout:
            return bytes(buf), False
        if not chunk:
            return bytes(buf), True
        buf += chunk
    return bytes(buf), False





# -- tests -----------------------------------------------------------------------


def test_bytes_flow_both_ways_and_stats(proxy, echo_upstream):
    upstream_port, events = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"]))
    sent = 0
    with connect_socket(port) as sock:
        for i in range(20):
            msg = f"message {i} ".encode() * (i + 1)
            sock.sendall(msg)
            assert recv_exactly(sock, len(msg)) == msg
            sent += len(msg)
        assert proc.stat("cluster.echo.upstream_cx_active") == 1
        assert proc.stat(f"listener.127.0.0.1:{port}.downstream_cx_active") == 1
    assert proc.wait_stat("cluster.echo.upstream_cx_destroy", 1) == 1
    assert proc.wait_stat(f"listener.127.0.0.1:{port}.downstream_cx_destroy", 1) == 1
    stats = proc.stats()
    assert stats["tcp.echo.downstream_cx_total"] == 1
    assert stats[f"listener.127.0.0.1:{port}.downstream_cx_total"] == 1
    assert stats[f"listener.127.0.0.1:{port}.downstream_cx_active"] == 0
    assert stats["cluster.echo.upstream_cx_total"] == 1
    assert stats["cluster.echo.upstream_cx_active"] == 0
    assert stats["tcp.echo.downstream_cx_rx_bytes_total"] == sent
    assert stats["cluster.echo.upstream_cx_tx_bytes_total"] == sent
    # The echo server also answered the client's close with "<eof>", which
    # the proxy forwarded (and the client never read).
    assert stats["cluster.echo.upstream_cx_rx_bytes_total"] in (sent, sent + len(b"<eof>"))
    assert stats["tcp.echo.downstream_cx_tx_bytes_total"] == stats["cluster.echo.upstream_cx_rx_bytes_total"]
    assert stats["tcp.echo.idle_timeout"] == 0
    assert wait_for(lambda: "lost" in events)


def test_stat_prefix_and_many_connections(proxy, echo_upstream):
    upstream_port, _ = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"], tcp_extra=", stat_prefix: db"))
    socks = [connect_socket(port) for _ in range(10)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"x%d" % i)
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, len(b"x%d" % i)) == b"x%d" % i
        assert proc.stat("cluster.echo.upstream_cx_active") == 10
    finally:
        for sock in socks:
            sock.close()
    assert proc.wait_stat("cluster.echo.upstream_cx_destroy", 10) == 10
    stats = proc.stats()
    assert stats["tcp.db.downstream_cx_total"] == 10
    assert "tcp.echo.downstream_cx_total" not in stats


def test_upstream_that_speaks_first(proxy):
    events: list[str] = []
    server, upstream_port = serve_protocol(lambda: Echo(events, greeting=b"220 ready\r\n"))
    try:
        port = free_port()
        proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"]))
        with connect_socket(port) as sock:
            assert recv_exactly(sock, 11) == b"220 ready\r\n"
            sock.sendall(b"QUIT\r\n")
            assert recv_exactly(sock, 6) == b"QUIT\r\n"
    finally:
        server.stop()


def test_client_half_close_upstream_still_answers(proxy, echo_upstream):
    upstream_port, events = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"]))
    with connect_socket(port) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        data, closed = read_to_close(sock)
    # The upstream saw the EOF, answered after it, then closed; the client
    # got the answer and then the close.
    assert data == b"last words<eof>"
    assert closed
    assert wait_for(lambda: "lost" in events)
    assert events.index("eof") < events.index("lost")
    assert proc.wait_stat("cluster.echo.upstream_cx_destroy", 1) == 1
    assert proc.wait_stat(f"listener.127.0.0.1:{port}.downstream_cx_destroy", 1) == 1


class EarlyEof(asyncio.Protocol):
    """Sends a greeting and shuts down its write side at once, then records
    what the client still sends until the client's EOF."""

    def __init__(self, received: list[bytes]) -> None:
        self.received = received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(b"greeting")
        self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self) -> bool:
        self.received.append(b"<eof>")
        self.transport.close()
        return True


def test_upstream_half_close_client_can_still_send(proxy):
    received: list[bytes] = []
    server, upstream_port = serve_protocol(lambda: EarlyEof(received))
    try:
        port = free_port()
        proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"]))
        with connect_socket(port) as sock:
            data, closed = read_to_close(sock)
            assert (data, closed) == (b"greeting", True)  # EOF passed on
            sock.sendall(b"after your eof")  # the other direction is still open
            sock.shutdown(socket.SHUT_WR)
            assert wait_for(lambda: b"<eof>" in received)
            assert b"".join(received) == b"after your eof<eof>"
    finally:
        server.stop()


def test_upstream_refuses(proxy):
    port = free_port()
    dead = free_port()  # nothing listens here: connect is refused
    proc = proxy.start(tcp_config(port, [f"127.0.0.1:{dead}"]))
    with connect_socket(port) as sock:
        sock.sendall(b"hello?")
        data, closed = read_to_close(sock)
    assert (data, closed) == (b"", True)
    assert proc.wait_stat("cluster.echo.upstream_cx_connect_fail", 1) == 1
    assert proc.wait_stat(f"listener.127.0.0.1:{port}.downstream_cx_destroy", 1) == 1
    stats = proc.stats()
    assert stats["cluster.echo.upstream_cx_total"] == 1
    assert stats["cluster.echo.upstream_cx_active"] == 0
    assert stats["cluster.echo.upstream_cx_connect_attempts_exceeded"] == 1
    assert stats["tcp.echo.upstream_connect_fail"] == 1
    assert stats["tcp.echo.downstream_cx_total"] == 1
    assert f"connect to cluster echo host 127.0.0.1:{dead} failed" in proc.output()


def test_connect_timeout(proxy):
    # A listener whose accept queue is full: Linux drops further SYNs, so a
    # connect to it neither succeeds nor fails until the proxy gives up.
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    stuck_port = stuck.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", stuck_port))
            fillers.append(filler)
        time.sleep(0.2)
        port = free_port()
        proc = proxy.start(tcp_config(port, [f"127.0.0.1:{stuck_port}"], cluster_extra="    connect_timeout: 500ms"))
        with connect_socket(port) as sock:
            start = time.monotonic()
            data, closed = read_to_close(sock, timeout=5.0)
            elapsed = time.monotonic() - start
        assert (data, closed) == (b"", True)
        assert 0.3 <= elapsed <= 3.0, elapsed
        assert proc.wait_stat("cluster.echo.upstream_cx_connect_timeout", 1) == 1
        assert proc.stat("cluster.echo.upstream_cx_connect_fail") == 1
        assert proc.stat("tcp.echo.upstream_connect_fail") == 1
        assert f"connect to cluster echo host 127.0.0.1:{stuck_port} failed: timed out" in proc.output()
    finally:
        for filler in fillers:
            filler.close()
        stuck.close()


def test_max_connections_circuit_breaker(proxy, echo_upstream):
    upstream_port, _ = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(
        port, [f"127.0.0.1:{upstream_port}"], cluster_extra="    circuit_breakers: {max_connections: 1}",
    ))
    with connect_socket(port) as first:
        first.sendall(b"one")
        assert recv_exactly(first, 3) == b"one"
        with connect_socket(port) as second:
            data, closed = read_to_close(second)
            assert (data, closed) == (b"", True)
        assert proc.stat("cluster.echo.upstream_cx_overflow") == 1
        first.sendall(b"still")  # the first connection is unaffected
        assert recv_exactly(first, 5) == b"still"
    assert proc.wait_stat("cluster.echo.upstream_cx_destroy", 1) == 1
    assert proc.stat("cluster.echo.upstream_cx_total") == 1


def test_connect_failure_is_retried_on_another_host(proxy, echo_upstream):
    upstream_port, _ = echo_upstream
    port = free_port()
    dead = free_port()
    proc = proxy.start(tcp_config(
        port, [f"127.0.0.1:{dead}", f"127.0.0.1:{upstream_port}"], tcp_extra=", max_connect_attempts: 2",
    ))
    for i in range(4):
        with connect_socket(port) as sock:
            sock.sendall(b"try %d" % i)
            assert recv_exactly(sock, 5) == b"try %d" % i
    stats = proc.stats()
    assert stats["cluster.echo.upstream_cx_connect_fail"] >= 1  # the dead host was tried
    assert stats.get("tcp.echo.upstream_connect_fail", 0) == 0  # and never cost a client its connection
    assert stats["cluster.echo.upstream_cx_total"] == 4 + stats["cluster.echo.upstream_cx_connect_fail"]


def test_idle_timeout_closes_both_sides(proxy, echo_upstream):
    upstream_port, events = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"], idle="1s"))
    with connect_socket(port) as sock:
        # Traffic every 0.3s for 1.5s: longer than the idle timeout in all,
        # never idle for it.
        for i in range(5):
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            time.sleep(0.3)
        assert proc.stat("tcp.echo.idle_timeout") == 0
        start = time.monotonic()
        data, closed = read_to_close(sock, timeout=5.0)
        elapsed = time.monotonic() - start
    assert closed and data == b""
    # The last ping was 0.3s before `start`.
    assert 0.5 <= elapsed <= 2.5, elapsed
    assert proc.wait_stat("tcp.echo.idle_timeout", 1) == 1
    assert wait_for(lambda: "lost" in events)
    assert proc.wait_stat("cluster.echo.upstream_cx_destroy", 1) == 1


def test_idle_timeout_zero_disables(proxy, echo_upstream):
    upstream_port, _ = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"], idle="0s"))
    with connect_socket(port) as sock:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
        time.sleep(1.5)
        sock.sendall(b"b")
        assert recv_exactly(sock, 1) == b"b"
    assert proc.stat("tcp.echo.idle_timeout") == 0


def test_max_downstream_connection_duration(proxy, echo_upstream):
    upstream_port, _ = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(
        port, [f"127.0.0.1:{upstream_port}"], idle="10s", tcp_extra=", max_downstream_connection_duration: 1s",
    ))
    with connect_socket(port) as sock:
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 4.0:
            try:
                sock.sendall(b"busy")
                got = recv_exactly(sock, 4)
            except (ConnectionResetError, BrokenPipeError):
                got = b""
            if got != b"busy":
                closed = True
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - start
    assert closed
    assert 0.8 <= elapsed <= 2.5, elapsed
    assert proc.wait_stat("tcp.echo.max_downstream_connection_duration", 1) == 1
    assert proc.stat("tcp.echo.idle_timeout") == 0


def test_upstream_reset_closes_downstream(proxy, echo_upstream):
    upstream_port, _ = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"]))
    with connect_socket(port) as sock:
        sock.sendall(b"reset")
        data, closed = read_to_close(sock)
    assert closed and data == b""
    assert proc.wait_stat("cluster.echo.upstream_cx_destroy", 1) == 1
    assert proc.wait_stat(f"listener.127.0.0.1:{port}.downstream_cx_destroy", 1) == 1
    assert proc.stat("cluster.echo.upstream_cx_active") == 0


def test_downstream_reset_closes_upstream(proxy, echo_upstream):
    upstream_port, events = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"]))
    sock = connect_socket(port)
    sock.sendall(b"hi")
    assert recv_exactly(sock, 2) == b"hi"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a RST, not a FIN
    # The proxy closes its upstream connection (with a FIN, after flushing).
    assert wait_for(lambda: "lost" in events)
    assert proc.wait_stat("cluster.echo.upstream_cx_destroy", 1) == 1
    assert proc.stat("cluster.echo.upstream_cx_active") == 0


class Source(asyncio.Protocol):
    """Sends ``total`` bytes as fast as the connection takes them (honouring
    pause_writing), then closes. ``state["sent"]`` is how far it got."""

    def __init__(self, total: int, base: bytes, state: dict[str, Any]) -> None:
        self.total = total
        self.base = base
        self.state = state
        self.paused = False
        self.sent = 0
        self.index = 0
        self.digest = hashlib.sha256()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.pump()

    def pump(self) -> None:
        while not self.paused and self.sent < self.total:
            chunk = chunk_at(self.index, self.base)
            self.index += 1
            self.digest.update(chunk)
            self.sent += len(chunk)
            self.state["sent"] = self.sent
            self.transport.write(chunk)  # may call pause_writing
        if self.sent >= self.total and not self.transport.is_closing():
            self.state["digest"] = self.digest.hexdigest()
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()


def test_large_download_to_a_slow_reader_is_intact_and_bounded(proxy):
    base = os.urandom(CHUNK)
    state: dict[str, Any] = {"sent": 0}
    server, upstream_port = serve_protocol(lambda: Source(BIG, base, state), sndbuf=CHUNK)
    try:
        port = free_port()
        proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"], idle="30s"))
        before = rss_bytes(proc.proc.pid)
        with connect_socket(port, timeout=10.0, rcvbuf=CHUNK) as sock:
            digest = hashlib.sha256()
            first = recv_exactly(sock, CHUNK)
            digest.update(first)
            # The client stops reading: the upstream must be held back, and the
            # proxy must not soak up the rest of the stream in its own memory.
            time.sleep(1.5)
            stalled_sent = state["sent"]
            grown = rss_bytes(proc.proc.pid) - before
            received = len(first)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                received += len(chunk)
        assert stalled_sent < BIG * 3 // 4, stalled_sent
        assert grown < 8 * 1024 * 1024, grown  # about 1 MiB in practice
        assert received == BIG
        assert digest.hexdigest() == state["digest"]
        assert proc.wait_stat("tcp.echo.downstream_cx_tx_bytes_total", BIG) == BIG
        assert proc.stat("cluster.echo.upstream_cx_rx_bytes_total") == BIG
    finally:
        server.stop()


class Sink(asyncio.Protocol):
    """Reads nothing for ``stall`` seconds, then hashes everything; answers
    the hex digest and its byte count on EOF."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.digest = hashlib.sha256()
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(self.stall, self.transport.resume_reading)

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(f"{self.digest.hexdigest()} {self.count}".encode())
        self.transport.close()
        return True


def test_large_upload_to_a_slow_upstream_is_intact_and_bounded(proxy):
    server, upstream_port = serve_protocol(lambda: Sink(stall=2.5), rcvbuf=CHUNK)
    try:
        port = free_port()
        proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"], idle="30s"))
        before = rss_bytes(proc.proc.pid)
        base = os.urandom(CHUNK)
        sent = {"n": 0}
        digest = hashlib.sha256()
        sock = connect_socket(port, timeout=30.0, sndbuf=CHUNK)

        def send_all() -> None:
            for i in range(BIG // CHUNK):
                chunk = chunk_at(i, base)
                digest.update(chunk)
                sock.sendall(chunk)
                sent["n"] += len(chunk)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        time.sleep(1.5)  # the upstream is not reading yet
        stalled_sent = sent["n"]
        grown = rss_bytes(proc.proc.pid) - before
        sender.join(60)
        assert not sender.is_alive()
        sock.shutdown(socket.SHUT_WR)
        answer, closed = read_to_close(sock, timeout=30.0)
        sock.close()
        assert stalled_sent < BIG * 3 // 4, stalled_sent
        assert grown < 8 * 1024 * 1024, grown  # about 1 MiB in practice
        assert answer.decode() == f"{digest.hexdigest()} {BIG}"
        assert closed
        stats = proc.stats()
        assert stats["tcp.echo.downstream_cx_rx_bytes_total"] == BIG
        assert stats["tcp.echo.downstream_flow_control_paused_reading_total"] >= 1
        assert stats["tcp.echo.downstream_flow_control_resumed_reading_total"] >= 1
    finally:
        server.stop()


def test_draining_lets_open_connections_finish(proxy, echo_upstream):
    upstream_port, _ = echo_upstream
    port = free_port()
    proc = proxy.start(tcp_config(port, [f"127.0.0.1:{upstream_port}"], idle="30s"))
    with connect_socket(port) as sock:
        sock.sendall(b"before")
        assert recv_exactly(sock, 6) == b"before"
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        sock.sendall(b"during")  # still served while the proxy drains
        assert recv_exactly(sock, 6) == b"during"
        sock.shutdown(socket.SHUT_WR)
        data, closed = read_to_close(sock)
        assert (data, closed) == (b"<eof>", True)
    # The last connection ended: the proxy need not wait out its drain timeout.
    proc.proc.wait(timeout=4)


def test_unknown_cluster_is_refused_at_startup(proxy):
    port = free_port()
    text = tcp_config(port, ["127.0.0.1:1"]).replace("cluster: echo,", "cluster: nosuch,")
    proc = proxy.start(text, wait=False)
    assert proc.proc.wait(timeout=15) != 0
    assert "nosuch" in proc.output()


def test_validate_rejects_bad_tcp_config(proxy):
    port = free_port()
    text = tcp_config(port, ["127.0.0.1:1"], idle="5 s", tcp_extra=", max_connect_attempts: 0, colour: blue")
    path, _ = proxy.config(text, name="bad.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "outrider", "validate", str(path)], capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    for fragment in ("idle_timeout", "max_connect_attempts", "colour"):
        assert fragment in result.stderr, result.stderr
