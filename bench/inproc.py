#!/usr/bin/env python3
"""CPU cost of one proxied HTTP/1.1 request, without sockets.

    python3 bench/inproc.py              # microseconds per request
    python3 bench/inproc.py --profile    # and where they go (cProfile)
    python3 bench/inproc.py --access-log /tmp/access.log   # with a file access log (default format)
    python3 bench/inproc.py --tracing zipkin --sampling 0   # with tracing (spans are queued, not sent)

Builds the real server from a config (router, request ids, stats: the same
path ``bench/run.py`` measures) and drives one downstream and one upstream
connection through in-memory transports: each round feeds a request to the
downstream connection and a canned response to the upstream one. The result
excludes the kernel and the event loop's I/O, so it moves only when the
Python path does: use it to compare changes, and bench/run.py for the truth.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time
from typing import Any

from outrider.config import load_config_text
from outrider.registry import load_registry
from outrider.server import Server

CONFIG = """
listeners:
  - name: bench
    address: 127.0.0.1:1
    http:
      stat_prefix: bench
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {prefix: /}
              route: {cluster: upstream}
clusters:
  - name: upstream
    endpoints: ["127.0.0.1:2"]
"""

REQUEST = b"GET /12 HTTP/1.1\r\nHost: 127.0.0.1:10000\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 23:31:11 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\nLast-Modified: Thu, 26 Nov 2026 23:31:10 GMT\r\n"
    b"Connection: keep-alive\r\nETag: \"6b08c13e-c\"\r\nAccept-Ranges: bytes\r\n\r\nhello world\n"
)


class MemoryTransport(asyncio.Transport):
    """Keeps what is written; counts it."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.written = 0

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def access_log_block(path: str) -> str:
    """The listener's ``access_log:`` block: one file access log in Envoy's
    default format (shared with bench/run.py)."""
    return f"""    access_log:
      - name: file
        config: {{path: {json.dumps(path)}}}
"""


def tracing_block(provider: str, sampling: float) -> str:
    """A top-level ``tracing:`` block; its collector is never contacted here."""
    return f"""tracing:
  provider: {{name: {provider}, config: {{collector: "http://127.0.0.1:9/"}}}}
  sampling: {sampling}
"""


async def run(
    rounds: int, profile: bool, access_log: str | None = None, tracing: str | None = None, sampling: float = 100
) -> float:
    registry = load_registry()
    text = CONFIG.replace("clusters:", access_log_block(access_log) + "clusters:", 1) if access_log else CONFIG
    if tracing:
        text += tracing_block(tracing, sampling)
    config = load_config_text(text, registry, source="<inproc>")
    server = Server(config, registry, config_source="<inproc>")
    server.build()
    listener = server.listeners[0]
    cluster = server.clusters["upstream"]
    upstream: list[Any] = []

    def connect_in_memory(pool: Any) -> None:
        conn = pool._make_protocol(pool)
        conn.connection_made(MemoryTransport(("127.0.0.1", 2)))
        pool._connections.add(conn)
        upstream.append(conn)
        pool.release(conn)

    downstream = listener._make_protocol()
    downstream.connection_made(MemoryTransport(("127.0.0.1", 40000)))
    # The first request opens the pooled connection; later ones reuse it.
    pool = cluster.pool(cluster.hosts[0], cluster.codec)
    pool._connect = lambda: connect_in_memory(pool)
    downstream.data_received(REQUEST)
    upstream[0].data_received(RESPONSE)
    await asyncio.sleep(0)

    profiler = cProfile.Profile() if profile else None
    feed_down, feed_up = downstream.data_received, upstream[0].data_received
    if profiler:
        profiler.enable()
    # The best of several batches: the least disturbed by the rest of the machine.
    batches = 1 if profiler else 7
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(rounds // batches):
            feed_down(REQUEST)
            feed_up(RESPONSE)
            await asyncio.sleep(0)  # let call_soon work run, as the loop would
        best = min(best, (time.perf_counter() - start) / (rounds // batches))
    if profiler:
        profiler.disable()
    assert server.stats.counter("cluster.upstream.upstream_rq_2xx").value == (rounds // batches) * batches + 1
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    for access_logs in server.access_logs:
        access_logs.close()  # flush what is left
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=70_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--access-log", metavar="PATH", help="add a file access log (default format) writing to PATH")
    parser.add_argument("--tracing", choices=("zipkin", "opentelemetry"), help="add tracing with this provider")
    parser.add_argument("--sampling", type=float, default=100, help="with --tracing: percent sampled (default 100)")
    args = parser.parse_args()
    bench = run(args.rounds, args.profile, args.access_log, args.tracing, args.sampling)
    try:
        import uvloop  # the loop outrider run uses
    except ImportError:  # pragma: no cover
        us = asyncio.run(bench)
    else:
        us = uvloop.run(bench)
    print(f"{us:.1f} us of CPU per proxied request (in-process, no sockets)")


if __name__ == "__main__":
    main()
