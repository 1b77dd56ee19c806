"""Shared fixtures: a proxy runner and real upstream servers."""

from __future__ import annotations

import pytest

from support import ProxyRunner, echo_app, start_aiohttp


@pytest.fixture
def proxy(tmp_path):
    """``proxy.start(yaml_text)`` runs ``outrider run -c`` on that config and
    waits for its admin /ready; every proxy is stopped at the end of the test."""
    runner = ProxyRunner(tmp_path)
    yield runner
    runner.stop_all()


@pytest.fixture
def upstream():
    """A real aiohttp upstream that echoes the request as JSON; yields
    ``(port, app)`` — ``app["requests"]`` lists what it received."""
    app = echo_app("upstream")
    server, port = start_aiohttp(app)
    yield port, app
    server.stop()


@pytest.fixture
def upstream_pair():
    """Two echo upstreams named "a" and "b"."""
    servers = []
    result = []
    for name in ("a", "b"):
        app = echo_app(name)
        server, port = start_aiohttp(app)
        servers.append(server)
        result.append((port, app))
    yield result
    for server in servers:
        server.stop()
