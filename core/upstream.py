"""Upstream hosts and the load-balancer contract.

A ``load_balancers`` extension's factory is called once per cluster at config
time as ``factory(config, ctx, hosts=hosts)`` (``ctx`` is the
:class:`~outrider.BuildContext`) and returns an object with the two methods
of :class:`LoadBalancer`. ``choose`` runs on every request: keep it O(1)-ish
and allocation-free.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class Host:
    """One upstream endpoint of a cluster."""

    __slots__ = ("address", "host", "port", "weight", "healthy", "active_requests", "active_connections", "cluster_name")

    def __init__(self, host: str, port: int, weight: int = 1, cluster_name: str = "") -> None:
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.weight = weight
        #: False while health checking or outlier detection has it out.
        self.healthy = True
        #: Requests in flight to this host (least_request reads it).
        self.active_requests = 0
        self.active_connections = 0
        self.cluster_name = cluster_name

    def __repr__(self) -> str:
        return f"<Host {self.address} w={self.weight}{'' if self.healthy else ' unhealthy'}>"


class LoadBalancer(Protocol):
    """What a ``load_balancers`` extension's factory returns."""

    def choose(self, context: Any = None) -> Host | None:
        """The host for the next request, or ``None`` when no host is healthy.

        ``context`` is the request's :class:`outrider.http.message.RequestHead`
        for HTTP (``None`` for TCP); hash-based balancers read it.
        """

    def hosts_changed(self, hosts: Sequence[Host]) -> None:
        """The cluster's host set or their health changed."""
