"""Stats sinks: the contract of the ``stats_sinks`` category, and how the
server runs them.

A sink is configured under ``stats.sinks`` (``- prometheus`` or
``- {name: statsd, config: {...}}``). The server calls the extension's
factory once per entry, at config time, before anything is bound::

    sink = factory(config, ctx)      # config: the entry's validated config block

and the object it returns provides:

``flush_interval: float | None``
    Seconds between two :meth:`flush` calls; ``None`` (or ``0``) for a sink
    that is never pushed to (one that is read, such as Prometheus).
``start(store) -> None``
    Called once on the event loop when the server is live. ``store`` is the
    :class:`outrider.stats.StatsStore`; a pull sink keeps it to read
    snapshots from later (``SnapshotTaker(store).take()``).
``flush(snapshot) -> None``
    Called every ``flush_interval`` on the event loop with an
    :class:`outrider.stats.Snapshot`: every counter with its value and its
    delta since this sink's previous flush, every gauge, every histogram with
    the interval since the previous flush and its cumulative statistics, each
    with its tag-extracted name and tags. It must not block: hand slow work
    (network writes) to the loop, e.g. a datagram transport.
``stop() -> None``
    Called once on shutdown, after a final ``flush`` of what the last
    interval collected. Release sockets, files and tasks here.
``admin_endpoints() -> Iterable[AdminEndpoint]`` (optional)
    GET endpoints the sink serves on the admin interface (the ``prometheus``
    sink serves ``/stats/prometheus``). Collected when the sink is built; two
    sinks claiming one path is a startup error.

A sink that fails must cost a stat and a rate-limited log line, never a
request: the server catches an exception from ``start``, ``flush`` or
``stop``, counts it in ``stats_sinks.<name>.flush_error`` and logs it at most
once per :data:`LOG_INTERVAL` (see :class:`RateLimitedLog`, which sinks use
for their own failures, such as a collector that refuses datagrams).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Protocol

from .stats import Counter, Snapshot, SnapshotTaker, StatsStore

log = logging.getLogger("outrider.stats_sinks")

#: At most one log line per this many seconds for one kind of sink failure.
LOG_INTERVAL = 30.0

#: What an admin endpoint handler returns: (status, content type, body).
AdminResponse = tuple[int, str, "str | bytes"]


class AdminEndpoint(NamedTuple):
    """A GET endpoint an extension serves on the admin interface.

    ``handler(query)`` gets the query parameters (a mapping of name to the
    last value given) and returns ``(status, content_type, body)``; a
    ``ValueError`` it raises becomes a 400 with its message.
    """

    path: str
    description: str
    handler: Callable[[Mapping[str, str]], AdminResponse]


class StatsSink(Protocol):
    """What a ``stats_sinks`` factory returns (see the module docstring)."""

    flush_interval: float | None

    def start(self, store: StatsStore) -> None: ...

    def flush(self, snapshot: Snapshot) -> None: ...

    def stop(self) -> None: ...


class RateLimitedLog:
    """Logs a repeating failure at most once per ``interval`` seconds, with
    the number of occurrences that were not logged in between."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            # Counted since the last line, which may be long before the last
            # interval: say so rather than name the interval.
            message += " (and %d more times since this was last logged, %.3gs ago)"
            args = (*args, self._suppressed, now - self._next + self.interval)
        self._suppressed = 0
        self._next = now + self.interval
        self.logger.log(level, message, *args)


class SinkRunner:
    """One configured sink: its flush timer, its snapshots and its failures."""

    def __init__(self, name: str, sink: Any, store: StatsStore) -> None:
        self.name = name
        self.sink = sink
        self.store = store
        interval = getattr(sink, "flush_interval", None)
        self.flush_interval: float | None = float(interval) if interval else None
        self.errors: Counter = store.counter(f"stats_sinks.{name}.flush_error")
        self._taker = SnapshotTaker(store)
        self._timer: asyncio.TimerHandle | None = None
        self._log = RateLimitedLog(log)
        self.started = False

    def admin_endpoints(self) -> list[AdminEndpoint]:
        endpoints = getattr(self.sink, "admin_endpoints", None)
        return list(endpoints()) if endpoints is not None else []

    def _guard(self, what: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:  # a sink's bug costs a stat and a log line
            self.errors.value += 1
            self._log(logging.ERROR, "stats sink %r failed in %s: %r", self.name, what, exc)

    def start(self) -> None:
        self.started = True
        self._guard("start", lambda: self.sink.start(self.store))
        if self.flush_interval:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._tick)

    def _tick(self) -> None:
        self.flush()
        self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._tick)  # type: ignore[arg-type]

    def flush(self) -> None:
        self._guard("flush", lambda: self.sink.flush(self._taker.take()))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.started and self.flush_interval:
            self.flush()  # what the last, partial interval collected
        self.started = False
        self._guard("stop", self.sink.stop)


def build_sinks(refs: Iterable[Mapping[str, Any]], ctx: Any) -> list[SinkRunner]:
    """Build each ``{name, config}`` of ``stats.sinks`` (config time)."""
    runners = []
    paths: dict[str, str] = {}
    for ref in refs:
        sink = ctx.build("stats_sinks", ref)
        runner = SinkRunner(ref["name"], sink, ctx.stats)
        for endpoint in runner.admin_endpoints():
            if endpoint.path in paths:
                raise ValueError(
                    f"stats sinks {paths[endpoint.path]!r} and {ref['name']!r} both serve the admin path {endpoint.path}"
                )
            paths[endpoint.path] = ref["name"]
        runners.append(runner)
    return runners
