"""The stats store: Envoy-style named counters, gauges and histograms.

Recording on the hot path is an attribute increment (``counter.value += 1``)
on an object resolved once at config time, never a dictionary walk or a lock.
A histogram's ``record(ms)`` is one ``bisect`` into a preallocated list of
bucket counts plus one addition; quantiles are computed only when someone
reads them (the admin's ``/stats``, a sink's flush).

Sinks read the store through :class:`SnapshotTaker` (cumulative values,
counter deltas and histogram intervals since that taker's previous snapshot),
with names split Envoy-style into a tag-extracted name and tags by
:class:`TagExtractor` (``cluster.api.upstream_rq_2xx`` → ``cluster.upstream_rq_xx``
with ``cluster=api, response_code_class=2xx``). The sink contract is in
``outrider.sinks``.
"""

from __future__ import annotations

import math
import re
import time
from bisect import bisect_left, bisect_right
from typing import Any, Iterable, Iterator, Mapping, NamedTuple


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


# -- histograms -----------------------------------------------------------------


def _log_linear_bounds() -> tuple[float, ...]:
    # Two significant digits per bucket (10, 11, ... 99 times a power of ten)
    # from 0.01 ms to 10^7 ms (2.8 h): a quantile read from these is within a
    # few percent of the true value, and every Envoy default bucket bound
    # (0.5, 1, 5, 10, 25, ...) is one of them, so exported buckets are exact.
    bounds = []
    for exponent in range(-3, 6):
        for mantissa in range(10, 100):
            bounds.append(mantissa / 10 ** -exponent if exponent < 0 else float(mantissa * 10**exponent))
    bounds.append(1e7)
    return tuple(bounds)


#: The bounds (upper, inclusive, in ms) of a histogram's internal buckets.
BOUNDS: tuple[float, ...] = _log_linear_bounds()

#: The buckets a histogram is exported with (Prometheus ``le``), in ms:
#: Envoy's defaults.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)

#: The quantiles the admin interface shows, as Envoy does (percent).
SUPPORTED_QUANTILES: tuple[float, ...] = (0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100)


class HistogramStatistics:
    """Bucket counts, their total and the sum of the recorded values: a
    histogram's whole history (cumulative) or one interval of it."""

    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...], counts: list[int], total: float) -> None:
        self.bounds = bounds
        #: ``counts[i]`` values fell in ``(bounds[i-1], bounds[i]]``; the last
        #: one counts the values above the last bound.
        self.counts = counts
        self.count = sum(counts)
        self.sum = total

    def quantiles(self, percents: Iterable[float] = SUPPORTED_QUANTILES) -> list[float]:
        """The estimated value at each percentile (NaN when nothing was
        recorded), interpolated linearly inside the bucket it falls in."""
        percents = list(percents)
        if not self.count:
            return [math.nan] * len(percents)
        order = sorted(range(len(percents)), key=percents.__getitem__)
        result = [math.nan] * len(percents)
        bounds, counts, last = self.bounds, self.counts, len(self.bounds)
        k, cumulative = 0, 0
        for i, c in enumerate(counts):
            if not c:
                continue
            lower = bounds[i - 1] if i else 0.0
            upper = bounds[i] if i < last else lower
            while k < len(order):
                rank = percents[order[k]] / 100.0 * self.count
                if rank > cumulative + c:
                    break
                result[order[k]] = lower + (upper - lower) * max(0.0, rank - cumulative) / c
                k += 1
            cumulative += c
        while k < len(order):  # only float rounding gets here: the maximum
            result[order[k]] = upper
            k += 1
        return result

    def quantile(self, percent: float) -> float:
        return self.quantiles((percent,))[0]

    def cumulative_buckets(self, bounds: Iterable[float] = DEFAULT_BUCKETS) -> list[tuple[float, int]]:
        """``(le, values <= le)`` for each of ``bounds``. Exact for bounds that
        are internal bounds (two significant digits); otherwise the values
        of the internal bucket straddling the bound are left out."""
        prefix = [0]
        for c in self.counts:
            prefix.append(prefix[-1] + c)
        internal = self.bounds
        out = []
        for le in bounds:
            i = bisect_left(internal, le)
            if i < len(internal) and internal[i] == le:
                out.append((le, prefix[i + 1]))
            else:
                out.append((le, prefix[bisect_right(internal, le)]))
        return out

    def nonzero(self) -> Iterator[tuple[float, int]]:
        """``(representative value, count)`` of each bucket that has values:
        the bucket's midpoint (its lower bound for the overflow bucket)."""
        bounds, last = self.bounds, len(self.bounds)
        for i, c in enumerate(self.counts):
            if c:
                lower = bounds[i - 1] if i else 0.0
                yield ((lower + bounds[i]) / 2 if i < last else lower), c

    def since(self, previous: "HistogramStatistics | None") -> "HistogramStatistics":
        """The interval from ``previous`` (an earlier cumulative) to this."""
        if previous is None:
            return self
        return HistogramStatistics(
            self.bounds, [a - b for a, b in zip(self.counts, previous.counts)], self.sum - previous.sum
        )


class Histogram:
    """A distribution of values in milliseconds (request times).

    ``record(value)`` costs a bisect and two additions; everything else
    (quantiles, buckets) is computed from the counts when read.
    """

    __slots__ = ("name", "bounds", "counts", "sum", "_latched", "_interval")
    kind = "histogram"
    unit = "ms"

    def __init__(self, name: str, bounds: tuple[float, ...] = BOUNDS) -> None:
        self.name = name
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._latched: HistogramStatistics | None = None
        self._interval: HistogramStatistics | None = None

    def record(self, value: float) -> None:
        """Add one value (ms). Values above the last bound are counted in an
        overflow bucket; values at or below the first, in the first."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def used(self) -> bool:
        return any(self.counts)

    def cumulative(self) -> HistogramStatistics:
        return HistogramStatistics(self.bounds, list(self.counts), self.sum)

    def latch(self) -> None:
        """Close the current interval (the admin shows the last closed one)."""
        now = self.cumulative()
        self._interval = now.since(self._latched) if self._latched is not None else now
        self._latched = now

    def interval(self) -> HistogramStatistics | None:
        """The last interval closed by :meth:`latch` (None before the first)."""
        return self._interval


# -- tag extraction ------------------------------------------------------------------

_LISTENER = re.compile(r"listener\.(.*?:\d+)\.(.+)")
_CODE_CLASS = re.compile(r"(.*_rq)_([1-5]xx)")
_CODE = re.compile(r"(.*_rq)_([1-5]\d\d)")

#: First name segment → the tag its second segment becomes.
SCOPE_TAGS: dict[str, str] = {
    "cluster": "cluster",
    "listener": "listener",
    "http": "stat_prefix",
    "tcp": "stat_prefix",
    "kafka": "stat_prefix",
}

Tags = tuple[tuple[str, str], ...]


class TagExtractor:
    """Splits a stat name into a tag-extracted name and tags, as Envoy does
    for Prometheus and DogStatsD:

    - ``cluster.<name>.X`` → ``cluster.X`` with ``cluster=<name>``;
      ``http.<stat_prefix>.X``, ``tcp.…``, ``kafka.…`` → ``stat_prefix``;
      ``listener.<host:port>.X`` → ``listener``;
    - a last segment ``…_rq_2xx`` → ``…_rq_xx`` with ``response_code_class=2xx``,
      ``…_rq_503`` → ``…_rq_code`` with ``response_code=503``.

    Names may hold dots (``cluster.api.v1.upstream_rq_total``): ``known``
    (scope → names, e.g. the configured clusters) is tried first, longest
    name first; otherwise the tag is the next segment. Results are cached.
    """

    def __init__(self, known: Mapping[str, Iterable[str]] | None = None) -> None:
        self.known = {scope: sorted(set(names), key=len, reverse=True) for scope, names in (known or {}).items()}
        self._cache: dict[str, tuple[str, Tags]] = {}

    @classmethod
    def for_config(cls, config: Mapping[str, Any]) -> "TagExtractor":
        """An extractor that knows the cluster names and stat prefixes of a
        normalised configuration."""
        known: dict[str, list[str]] = {"cluster": [c["name"] for c in config.get("clusters", ())]}
        for listener in config.get("listeners", ()):
            for key, block in listener.items():
                if isinstance(block, dict) and isinstance(block.get("stat_prefix"), str):
                    known.setdefault(key, []).append(block["stat_prefix"])
        return cls(known)

    def extract(self, name: str) -> tuple[str, Tags]:
        cached = self._cache.get(name)
        if cached is None:
            cached = self._cache[name] = self._extract(name)
        return cached

    def _extract(self, name: str) -> tuple[str, Tags]:
        tags: list[tuple[str, str]] = []
        scope, _, rest = name.partition(".")
        tag = SCOPE_TAGS.get(scope)
        base = name
        if tag is not None and rest:
            value = None
            if scope == "listener":
                match = _LISTENER.fullmatch(name)
                if match:
                    value, rest = match.groups()
            else:
                for known in self.known.get(scope, ()):
                    if rest.startswith(known + ".") and len(rest) > len(known) + 1:
                        value, rest = known, rest[len(known) + 1:]
                        break
                else:
                    first, dot, remainder = rest.partition(".")
                    if dot and remainder:
                        value, rest = first, remainder
            if value is not None:
                tags.append((tag, value))
                base = f"{scope}.{rest}"
        head, dot, last = base.rpartition(".")
        match = _CODE_CLASS.fullmatch(last)
        if match:
            tags.append(("response_code_class", match.group(2)))
            base = f"{head}{dot}{match.group(1)}_xx"
        else:
            match = _CODE.fullmatch(last)
            if match:
                tags.append(("response_code", match.group(2)))
                base = f"{head}{dot}{match.group(1)}_code"
        return base, tuple(tags)


# -- the store -----------------------------------------------------------------------


class StatsStore:
    """Every stat of one process, by full name.

    ``counter(name)``, ``gauge(name)`` and ``histogram(name)`` return the same
    object for the same name, so two listeners sharing a ``stat_prefix``
    share their counters, and a reload keeps the counts. Iterating the store
    gives the counters and gauges (sorted by name); :meth:`histograms` the
    histograms.
    """

    def __init__(self) -> None:
        self._stats: dict[str, Counter | Gauge] = {}
        self._histograms: dict[str, Histogram] = {}
        #: How sinks split names into tags (the server sets one that knows
        #: its clusters and stat prefixes).
        self.tag_extractor = TagExtractor()

    def _taken(self, name: str, kind: str) -> None:
        stat = self._stats.get(name) or self._histograms.get(name)
        if stat is not None:
            raise TypeError(f"stat {name!r} is a {stat.kind}, not a {kind}")

    def counter(self, name: str) -> Counter:
        stat = self._stats.get(name)
        if stat is None:
            self._taken(name, "counter")
            stat = self._stats[name] = Counter(name)
        elif not isinstance(stat, Counter):
            raise TypeError(f"stat {name!r} is a {stat.kind}, not a counter")
        return stat

    def gauge(self, name: str) -> Gauge:
        stat = self._stats.get(name)
        if stat is None:
            self._taken(name, "gauge")
            stat = self._stats[name] = Gauge(name)
        elif not isinstance(stat, Gauge):
            raise TypeError(f"stat {name!r} is a {stat.kind}, not a gauge")
        return stat

    def histogram(self, name: str) -> Histogram:
        stat = self._histograms.get(name)
        if stat is None:
            self._taken(name, "histogram")
            stat = self._histograms[name] = Histogram(name)
        return stat

    def scope(self, prefix: str) -> "StatsScope":
        """A view that prepends ``prefix.`` to every name."""
        return StatsScope(self, prefix)

    def get(self, name: str) -> Counter | Gauge | Histogram | None:
        return self._stats.get(name) or self._histograms.get(name)

    def __iter__(self) -> Iterator[Counter | Gauge]:
        return iter(sorted(self._stats.values(), key=lambda s: s.name))

    def histograms(self) -> list[Histogram]:
        return sorted(self._histograms.values(), key=lambda h: h.name)

    def latch_histograms(self) -> None:
        """Close every histogram's current interval (see Histogram.latch)."""
        for histogram in self._histograms.values():
            histogram.latch()

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

    def histogram(self, name: str) -> Histogram:
        return self.store.histogram(f"{self.prefix}.{name}")

    def scope(self, prefix: str) -> "StatsScope":
        return StatsScope(self.store, f"{self.prefix}.{prefix}")


class StatsGroup:
    """Named counters, gauges and histograms bound as attributes at construction.

    Subclasses list their stats; ``group.upstream_rq_total.value += 1`` and
    ``group.upstream_rq_time.record(ms)`` are then plain attribute accesses
    on the hot path::

        class ClusterStats(StatsGroup):
            COUNTERS = ("upstream_rq_total",)
            GAUGES = ("upstream_cx_active",)
            HISTOGRAMS = ("upstream_rq_time",)
    """

    COUNTERS: Iterable[str] = ()
    GAUGES: Iterable[str] = ()
    HISTOGRAMS: Iterable[str] = ()

    def __init__(self, scope: StatsScope) -> None:
        self.scope = scope
        for name in self.COUNTERS:
            setattr(self, name, scope.counter(name))
        for name in self.GAUGES:
            setattr(self, name, scope.gauge(name))
        for name in self.HISTOGRAMS:
            setattr(self, name, scope.histogram(name))


# -- snapshots for sinks -----------------------------------------------------------------


class CounterSample(NamedTuple):
    name: str
    tag_name: str
    tags: Tags
    value: int
    #: The increase since the previous snapshot of the same taker.
    delta: int


class GaugeSample(NamedTuple):
    name: str
    tag_name: str
    tags: Tags
    value: int


class HistogramSample(NamedTuple):
    name: str
    tag_name: str
    tags: Tags
    #: What was recorded since the previous snapshot of the same taker.
    interval: HistogramStatistics
    cumulative: HistogramStatistics


class Snapshot(NamedTuple):
    """Every stat at one moment (what a sink's ``flush`` receives)."""

    counters: list[CounterSample]
    gauges: list[GaugeSample]
    histograms: list[HistogramSample]
    #: Wall-clock time of the snapshot (seconds since the epoch).
    time: float


class SnapshotTaker:
    """Takes snapshots of a store, remembering the last one so that each
    carries counter deltas and histogram intervals since the previous (the
    first: since the start). One per consumer (e.g. per sink)."""

    def __init__(self, store: StatsStore) -> None:
        self.store = store
        self._counters: dict[str, int] = {}
        self._histograms: dict[str, HistogramStatistics] = {}

    def take(self) -> Snapshot:
        store, extract = self.store, self.store.tag_extractor.extract
        counters, gauges, histograms = [], [], []
        last = self._counters
        for stat in store:
            tag_name, tags = extract(stat.name)
            value = stat.value
            if isinstance(stat, Counter):
                counters.append(CounterSample(stat.name, tag_name, tags, value, value - last.get(stat.name, 0)))
                last[stat.name] = value
            else:
                gauges.append(GaugeSample(stat.name, tag_name, tags, value))
        previous = self._histograms
        for histogram in store.histograms():
            tag_name, tags = extract(histogram.name)
            cumulative = histogram.cumulative()
            histograms.append(
                HistogramSample(histogram.name, tag_name, tags, cumulative.since(previous.get(histogram.name)), cumulative)
            )
            previous[histogram.name] = cumulative
        return Snapshot(counters, gauges, histograms, time.time())
