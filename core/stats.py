"""The stats store: Envoy-style named counters and gauges.

Recording on the hot path is an attribute increment (``counter.value += 1``)
on an object resolved once at config time, never a dictionary walk or a lock.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator


class Counter:
    """A monotonically increasing count."""

    __slots__ = ("name", "value")
    kind = "counter"

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Gauge:
    """A value that goes up and down (active connections, healthy hosts)."""

    __slots__ = ("name", "value")
    kind = "gauge"

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def dec(self, amount: int = 1) -> None:
        self.value -= amount

    def set(self, value: int) -> None:
        self.value = value


class StatsStore:
    """Every stat of one process, by full name.

    ``counter(name)`` and ``gauge(name)`` return the same object for the same
    name, so two listeners sharing a ``stat_prefix`` share their counters, and a
    reload keeps the counts.
    """

    def __init__(self) -> None:
        self._stats: dict[str, Counter | Gauge] = {}

    def counter(self, name: str) -> Counter:
        stat = self._stats.get(name)
        if stat is None:
            stat = self._stats[name] = Counter(name)
        elif not isinstance(stat, Counter):
            raise TypeError(f"stat {name!r} is a {stat.kind}, not a counter")
        return stat

    def gauge(self, name: str) -> Gauge:
        stat = self._stats.get(name)
        if stat is None:
            stat = self._stats[name] = Gauge(name)
        elif not isinstance(stat, Gauge):
            raise TypeError(f"stat {name!r} is a {stat.kind}, not a gauge")
        return stat

    def scope(self, prefix: str) -> "StatsScope":
        """A view that prepends ``prefix.`` to every name."""
        return StatsScope(self, prefix)

    def get(self, name: str) -> Counter | Gauge | None:
        return self._stats.get(name)

    def __iter__(self) -> Iterator[Counter | Gauge]:
        return iter(sorted(self._stats.values(), key=lambda s: s.name))

    def snapshot(self, pattern: str | None = None) -> dict[str, int]:
        regex = re.compile(pattern) if pattern else None
        return {s.name: s.value for s in self if regex is None or regex.search(s.name)}


class StatsScope:
    """Stats under a common prefix, e.g. ``cluster.api.``."""

    __slots__ = ("store", "prefix")

    def __init__(self, store: StatsStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix.rstrip(".")

    def counter(self, name: str) -> Counter:
        return self.store.counter(f"{self.prefix}.{name}")

    def gauge(self, name: str) -> Gauge:
        return self.store.gauge(f"{self.prefix}.{name}")

    def scope(self, prefix: str) -> "StatsScope":
        return StatsScope(self.store, f"{self.prefix}.{prefix}")


class StatsGroup:
    """Named counters and gauges bound as attributes at construction.

    Subclasses list their stats; ``group.upstream_rq_total.value += 1`` is then
    a plain attribute access on the hot path::

        class ClusterStats(StatsGroup):
            COUNTERS = ("upstream_rq_total",)
            GAUGES = ("upstream_cx_active",)
    """

    COUNTERS: Iterable[str] = ()
    GAUGES: Iterable[str] = ()

    def __init__(self, scope: StatsScope) -> None:
        self.scope = scope
        for name in self.COUNTERS:
            setattr(self, name, scope.counter(name))
        for name in self.GAUGES:
            setattr(self, name, scope.gauge(name))
