"""prometheus: every stat in Prometheus' text exposition format, served on the
admin interface at ``/stats/prometheus`` (a pull sink: nothing is pushed).

Names become metric names with labels through the core's tag extraction
(``outrider.stats.TagExtractor``): ``cluster.api.upstream_rq_2xx`` is
``outrider_cluster_upstream_rq_xx_total{cluster="api",response_code_class="2xx"}``.
The text is written by prometheus-client, so it is what Prometheus' own
parser reads.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from outrider import BuildContext, Extension, StatsGroup, hookimpl
from outrider.sinks import AdminEndpoint, AdminResponse
from outrider.stats import DEFAULT_BUCKETS, Snapshot, SnapshotTaker, StatsStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_INVALID = re.compile(r"[^a-zA-Z0-9_]")

#: The sample names a family of each kind writes, by suffix.
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


class PrometheusStats(StatsGroup):
    """``stats_sinks.prometheus.*``"""

    COUNTERS = ("scrapes",)


class _Family:
    __slots__ = ("name", "kind", "help", "labelnames", "samples")

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.labelnames: list[str] = []
        self.samples: dict[tuple[tuple[str, str], ...], Any] = {}


class PrometheusSink:
    """Renders snapshots of the store for the admin's ``/stats/prometheus``."""

    flush_interval = None  # read, never pushed

    def __init__(self, config: Mapping[str, Any], ctx: BuildContext) -> None:
        self.namespace: str = config.get("namespace", "outrider")
        self.path: str = config.get("path", "/stats/prometheus")
        self.buckets = tuple(float(b) for b in config.get("buckets") or DEFAULT_BUCKETS)
        self.store: StatsStore = ctx.stats
        self.stats = PrometheusStats(ctx.stats.scope("stats_sinks.prometheus"))
        # (kind, tag-extracted name) → metric family name; names are fixed
        # once seen, so a new stat can never rename an existing metric.
        self._names: dict[tuple[str, str], str] = {}
        self._taken: dict[str, tuple[str, str]] = {}

    # -- the sink contract ------------------------------------------------------

    def start(self, store: StatsStore) -> None:
        self.store = store

    def flush(self, snapshot: Snapshot) -> None:  # pragma: no cover - never pushed
        pass

    def stop(self) -> None:
        pass

    def admin_endpoints(self) -> list[AdminEndpoint]:
        return [AdminEndpoint(self.path, "every stat in Prometheus text format; ?filter=REGEX, ?usedonly", self.scrape)]

    # -- rendering --------------------------------------------------------------

    def scrape(self, query: Mapping[str, str]) -> AdminResponse:
        pattern = query.get("filter")
        try:
            regex = re.compile(pattern) if pattern else None
        except re.error as exc:
            raise ValueError(f"invalid regex in filter {pattern!r}: {exc}") from None
        self.stats.scrapes.value += 1
        snapshot = SnapshotTaker(self.store).take()
        return 200, CONTENT_TYPE, self.render(snapshot, regex, "usedonly" in query)

    def render(self, snapshot: Snapshot, regex: re.Pattern[str] | None = None, used_only: bool = False) -> bytes:
        """``snapshot`` in the text exposition format (version 0.0.4)."""
        families: dict[str, _Family] = {}

        def add(kind: str, sample: Any, value: Any) -> None:
            if regex is not None and not regex.search(sample.name):
                return
            name = self._metric_name(kind, sample.tag_name)
            family = families.get(name)
            if family is None:
                family = families[name] = _Family(name, kind, f"Outrider {kind} {sample.tag_name}")
            for label, _ in sample.tags:
                if label not in family.labelnames:
                    family.labelnames.append(label)
            family.samples.setdefault(sample.tags, value)  # the first of two equal label sets wins

        for c in snapshot.counters:
            if c.value or not used_only:
                add("counter", c, c.value)
        for g in snapshot.gauges:
            if g.value or not used_only:
                add("gauge", g, g.value)
        for h in snapshot.histograms:
            if h.cumulative.count or not used_only:
                add("histogram", h, h.cumulative)
        return generate_latest(_Collector([self._build(f) for f in families.values()]))  # type: ignore[arg-type]

    def _metric_name(self, kind: str, tag_name: str) -> str:
        key = (kind, tag_name)
        name = self._names.get(key)
        if name is not None:
            return name
        base = _INVALID.sub("_", f"{self.namespace}_{tag_name}")
        if kind == "counter" and base.endswith("_total"):
            base = base[: -len("_total")]  # prometheus-client adds it back
        # A family's name and every sample name it writes must be its own:
        # a clash (a counter x and a gauge x_total, say) gets the kind appended.
        name = base
        while any(n in self._taken for n in self._written(kind, name)):
            name = f"{name}_{kind}"
        for n in self._written(kind, name):
            self._taken[n] = key
        self._names[key] = name
        return name

    @staticmethod
    def _written(kind: str, name: str) -> list[str]:
        return [name] + [name + suffix for suffix in _SUFFIXES[kind]]

    def _build(self, family: _Family) -> Metric:
        labelnames = family.labelnames
        if family.kind == "counter":
            metric: Any = CounterMetricFamily(family.name, family.help, labels=labelnames)
        elif family.kind == "gauge":
            metric = GaugeMetricFamily(family.name, family.help, labels=labelnames)
        else:
            metric = HistogramMetricFamily(family.name, family.help + " (ms)", labels=labelnames)
        for tags, value in family.samples.items():
            given = dict(tags)
            values = [given.get(label, "") for label in labelnames]
            if family.kind == "histogram":
                buckets = [(floatToGoString(le), n) for le, n in value.cumulative_buckets(self.buckets)]
                buckets.append(("+Inf", value.count))
                metric.add_metric(values, buckets, value.sum)
            else:
                metric.add_metric(values, value)
        return metric


class _Collector:
    """What generate_latest reads: the families of one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def create(config: Mapping[str, Any], ctx: BuildContext) -> PrometheusSink:
    return PrometheusSink(config, ctx)


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="prometheus",
            category="stats_sinks",
            factory=create,
            status="alpha",
            security_posture="robust_to_untrusted_downstream",
            description="Serves every stat in Prometheus text format at the admin's /stats/prometheus.",
        )
    )
