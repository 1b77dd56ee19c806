"""Clusters: named sets of upstream hosts, their load balancer, their
connection pools and their stats."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .pool import ConnectionPool
from .stats import StatsGroup
from .upstream import Host

if TYPE_CHECKING:  # pragma: no cover
    from .context import BuildContext

log = logging.getLogger("outrider.cluster")


class ClusterStats(StatsGroup):
    """``cluster.<name>.*``"""

    COUNTERS = (
        "upstream_rq_total",
        "upstream_rq_1xx",
        "upstream_rq_2xx",
        "upstream_rq_3xx",
        "upstream_rq_4xx",
        "upstream_rq_5xx",
        "upstream_rq_completed",
        "upstream_rq_timeout",
        "upstream_rq_per_try_timeout",
        "upstream_rq_retry",
        "upstream_rq_retry_success",
        "upstream_rq_retry_overflow",
        "upstream_rq_retry_limit_exceeded",
        "upstream_rq_pending_total",
        "upstream_rq_pending_overflow",
        "upstream_rq_rx_reset",
        "upstream_rq_tx_reset",
        "upstream_rq_cancelled",
        "upstream_cx_total",
        "upstream_cx_destroy",
        "upstream_cx_connect_fail",
        "upstream_cx_connect_timeout",
        "upstream_cx_overflow",
        "upstream_cx_idle_timeout",
        "upstream_cx_protocol_error",
        "upstream_cx_rx_bytes_total",
        "upstream_cx_tx_bytes_total",
        "upstream_cx_close_notify",
        "upstream_rq_max_duration_reached",
        "upstream_cx_none_healthy",
    )
    GAUGES = (
        "upstream_cx_active",
        "upstream_rq_active",
        "upstream_rq_pending_active",
        "membership_healthy",
        "membership_total",
    )
    HISTOGRAMS = ("upstream_rq_time",)

    def __init__(self, scope: Any) -> None:
        super().__init__(scope)
        self.by_class = [
            self.upstream_rq_1xx,
            self.upstream_rq_1xx,
            self.upstream_rq_2xx,
            self.upstream_rq_3xx,
            self.upstream_rq_4xx,
            self.upstream_rq_5xx,
        ]
        self._by_code: dict[int, Any] = {}

    def response(self, status: int) -> None:
        """Count an upstream response by class and by exact code."""
        self.upstream_rq_completed.value += 1
        if 100 <= status < 600:
            self.by_class[status // 100].value += 1
        counter = self._by_code.get(status)
        if counter is None:
            counter = self._by_code[status] = self.scope.counter(f"upstream_rq_{status}")
        counter.value += 1


class Cluster:
    """A named group of upstream hosts with one load balancer."""

    def __init__(self, config: dict[str, Any], ctx: "BuildContext") -> None:
        self.config = config
        self.name: str = config["name"]
        self.stats_scope_prefix = f"cluster.{self.name}"
        self.stats = ClusterStats(ctx.stats.scope(self.stats_scope_prefix))
        self.connect_timeout = float(config.get("connect_timeout", 5.0))
        self.idle_timeout = float(config.get("idle_timeout", 60.0))
        self.max_requests_per_connection = config.get("max_requests_per_connection")
        self.protocol = config.get("protocol", "http1")
        self.buffer_limit = int(config.get("per_connection_buffer_limit", 1024 * 1024))
        breakers = config.get("circuit_breakers", {})
        self.max_connections = int(breakers.get("max_connections", 1024))
        self.max_pending_requests = int(breakers.get("max_pending_requests", 1024))
        self.max_requests = int(breakers.get("max_requests", 1024))
        self.max_retries = int(breakers.get("max_retries", 3))
        #: Retries in flight across the cluster (checked against max_retries).
        self.active_retries = 0
        self.hosts = [
            Host(e["host"], e["port"], int(e.get("weight", 1)), self.name) for e in config["endpoints"]
        ]
        lb_ref = config.get("lb_policy") or {"name": "round_robin", "config": {}}
        self.lb = ctx.build("load_balancers", lb_ref, hosts=self.hosts)
        self.stats.membership_total.value = len(self.hosts)
        self.stats.membership_healthy.value = sum(1 for h in self.hosts if h.healthy)
        self._ctx = ctx
        self._codec: Any = None
        self._pools: dict[tuple[Host, Any], ConnectionPool] = {}
        self._host_pools: dict[Host, ConnectionPool] = {}  # for this cluster's own codec

    def choose_host(self, context: Any = None) -> Host | None:
        return self.lb.choose(context)

    def set_health(self, host: Host, healthy: bool) -> None:
        """Flip a host's health and tell the load balancer."""
        if host.healthy == healthy:
            return
        host.healthy = healthy
        self.stats.membership_healthy.value = sum(1 for h in self.hosts if h.healthy)
        self.lb.hosts_changed(self.hosts)

    @property
    def codec(self) -> Any:
        """The ``codecs`` extension that speaks this cluster's ``protocol``
        (resolved on first use: TCP-only clusters never need one)."""
        if self._codec is None:
            name = "http1" if self.protocol == "auto" else self.protocol
            ext = self._ctx.registry.get("codecs", name)
            if ext is None:
                raise LookupError(f"cluster {self.name}: no codec extension {name!r} is installed")
            self._codec = ext.factory({}, self._ctx.for_extension(ext))
        return self._codec

    def pool(self, host: Host, codec: Any) -> ConnectionPool:
        """The connection pool to ``host`` for ``codec``'s client connections."""
        key = (host, codec)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ConnectionPool(self, host, codec.client_protocol_factory)
        return pool

    def pool_for(self, host: Host) -> ConnectionPool:
        """``pool(host, self.codec)``, with one dict lookup (per request)."""
        pool = self._host_pools.get(host)
        if pool is None:
            pool = self._host_pools[host] = self.pool(host, self.codec)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._host_pools.clear()


class ClusterManager:
    """All clusters of one config, by name."""

    def __init__(self, configs: list[dict[str, Any]], ctx: "BuildContext") -> None:
        ctx.cluster_manager = self
        self.clusters: dict[str, Cluster] = {}
        for config in configs:
            self.clusters[config["name"]] = Cluster(config, ctx)

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.close()
