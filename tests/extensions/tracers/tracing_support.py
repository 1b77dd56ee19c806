"""What the tracer tests share: a real HTTP collector, a proxy config with
tracing, and raw upstreams that fail the way upstreams do."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx
from aiohttp import web

from support import start_aiohttp, start_raw

HEX16 = r"[0-9a-f]{16}"
HEX32 = r"[0-9a-f]{32}"


class Collector:
    """A real HTTP server playing the collector: it records every POST
    (path, content type, JSON body) and answers ``status``."""

    def __init__(self, status: int = 202) -> None:
        self.status = status
        self.posts: list[tuple[str, str, Any]] = []
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._receive)
        self.server, self.port = start_aiohttp(app)

    async def _receive(self, request: web.Request) -> web.Response:
        self.posts.append((request.path, request.content_type, json.loads(await request.read())))
        return web.Response(status=self.status)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def spans(self, spans_of: Callable[[Any], list[dict]]) -> list[dict]:
        return [span for _, _, body in list(self.posts) for span in spans_of(body)]

    def wait_spans(self, spans_of: Callable[[Any], list[dict]], count: int, timeout: float = 5.0) -> list[dict]:
        """The spans received once there are at least ``count`` (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        spans = self.spans(spans_of)
        while len(spans) < count and time.monotonic() < deadline:
            time.sleep(0.02)
            spans = self.spans(spans_of)
        return spans

    def settled_spans(self, spans_of: Callable[[Any], list[dict]], count: int) -> list[dict]:
        """Every span received, once ``count`` are in and a few more flush
        intervals passed: what was not received by then was not sent."""
        self.wait_spans(spans_of, count)
        time.sleep(0.2)
        return self.spans(spans_of)

    def stop(self) -> None:
        self.server.stop()


def hanging_collector() -> tuple[Any, int]:
    """A collector that accepts connections and reads, but never answers."""
    server, port, _ = start_raw(lambda data, transport: None)
    return server, port


def failing_first(status_line: bytes = b"HTTP/1.1 503 Service Unavailable") -> tuple[Any, int, list[bytes]]:
    """A raw upstream answering every request with ``status_line``; returns
    (server, port, the bytes it received)."""
    def answer(data: bytes, transport: Any) -> None:
        transport.write(status_line + b"\r\ncontent-length: 4\r\n\r\nbusy")

    return start_raw(answer)


def request_headers(raw: bytes) -> dict[str, str]:
    """The headers of a raw HTTP/1.1 request head (lower-case names)."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def config(port: int, endpoints: list[str], provider: str, tracer_config: str, sampling: float = 100,
           route_extra: str = "", http_extra: str = "") -> str:
    """One listener routing everything to cluster ``backend``, with tracing.
    ``http_extra`` is more of the listener's ``http:`` block (one line)."""
    eps = ", ".join(f'"{e}"' for e in endpoints)
    return f"""
tracing:
  provider:
    name: {provider}
    config: {tracer_config}
  sampling: {sampling}
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http:
      stat_prefix: web
      {http_extra}
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - name: everything
              match: {{prefix: /}}
              route: {{cluster: backend{route_extra}}}
clusters:
  - name: backend
    endpoints: [{eps}]
"""


def retrying_config(port: int, flaky_port: int, upstream_port: int, provider: str, tracer_config: str,
                    http_extra: str = "") -> str:
    """:func:`config` over [flaky, upstream] with one retry on 5xx: the
    first attempt gets the flaky host's 503 (round robin), the retry the upstream."""
    return config(port, [f"127.0.0.1:{flaky_port}", f"127.0.0.1:{upstream_port}"], provider, tracer_config,
                  route_extra=", retry_policy: {retry_on: [5xx], num_retries: 1}", http_extra=http_extra)


def seen_by_upstream(response: httpx.Response) -> dict[str, str]:
    """The request headers the echo upstream received (from its JSON answer)."""
    return dict(response.json()["headers"])


def validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "tracing.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "outrider", "validate", str(path)],
                          capture_output=True, text=True, timeout=30)
