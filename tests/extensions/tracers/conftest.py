"""Fixtures of the tracer tests: a real HTTP collector."""

from __future__ import annotations

import pytest

from tracing_support import Collector, failing_first


@pytest.fixture
def collector():
    """A real HTTP collector on loopback that accepts every report (202)."""
    c = Collector()
    yield c
    c.stop()


@pytest.fixture
def failing_collector():
    """A real HTTP collector that answers every report with a 500."""
    c = Collector(status=500)
    yield c
    c.stop()


@pytest.fixture
def flaky():
    """A raw upstream that answers every request 503; yields ``(port, the
    bytes it received)``."""
    server, port, received = failing_first()
    yield port, received
    server.stop()
