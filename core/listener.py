"""Listeners: bound sockets, connection accounting, draining.

A listener's protocol (``http``, or an extension's such as ``tcp``) supplies
the asyncio Protocol for each accepted connection. That protocol calls
``listener.connection_opened(self)`` from ``connection_made`` and
``listener.connection_closed(self)`` from ``connection_lost``; the listener
keeps the ``listener.<address>.*`` stats, enforces ``max_connections`` and
closes idle connections when draining.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Callable

from .stats import StatsGroup, StatsStore

log = logging.getLogger("outrider.listener")


class ListenerStats(StatsGroup):
    """``listener.<address>.*``"""

    COUNTERS = ("downstream_cx_total", "downstream_cx_destroy", "downstream_cx_overflow")
    GAUGES = ("downstream_cx_active",)


class Listener:
    """One configured listener."""

    #: An ``http`` listener's HttpConnectionManager (set by the server).
    http: Any = None
    #: Another protocol's handler (what its extension's factory returned).
    handler: Any = None
    #: The listener's access logs, for a protocol that declares
    #: ``supports_access_log``: it calls ``listener.access_log(session)`` once
    #: per finished connection (``None`` when none is configured).
    access_log: Any = None

    def __init__(
        self,
        config: dict[str, Any],
        protocol: str,
        protocol_factory: Callable[["Listener"], Callable[[], asyncio.Protocol]],
        stats: StatsStore,
    ) -> None:
        self.config = config
        self.name: str = config["name"]
        self.address: str = config["address"]
        self.host: str = config["host"]
        self.port: int = config["port"]
        self.protocol = protocol
        self.max_connections: int | None = config.get("max_connections")
        self.stats = ListenerStats(stats.scope(f"listener.{self.address}"))
        self._make_protocol = protocol_factory(self)
        self.connections: set[Any] = set()
        self.bound_addresses: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._drained: asyncio.Event | None = None
        self.draining = False

    async def start(self, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._make_protocol,
            host=self.host,
            port=self.port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        self.bound_addresses = []
        for sock in self._server.sockets:
            addr = sock.getsockname()
            if sock.family == socket.AF_INET6:
                self.bound_addresses.append(f"[{addr[0]}]:{addr[1]}")
            else:
                self.bound_addresses.append(f"{addr[0]}:{addr[1]}")
        log.info("listener %s (%s) bound on %s", self.name, self.protocol, ", ".join(self.bound_addresses))

    # -- called by protocols ---------------------------------------------

    def connection_opened(self, conn: Any) -> bool:
        """Account for a new connection; False means: close it (overflow)."""
        stats = self.stats
        stats.downstream_cx_total.value += 1
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            stats.downstream_cx_overflow.value += 1
            log.warning("listener %s: max_connections (%d) reached; closing a new connection", self.name, self.max_connections)
            return False
        self.connections.add(conn)
        stats.downstream_cx_active.value += 1
        return True

    def connection_closed(self, conn: Any) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.downstream_cx_active.value -= 1
            self.stats.downstream_cx_destroy.value += 1
            if self._drained is not None and not self.connections:
                self._drained.set()

    # -- shutting down ----------------------------------------------------

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let connections finish (each closes once idle),
        then close whatever is left after ``timeout`` seconds."""
        self.draining = True
        self.stop_accepting()
        for conn in list(self.connections):
            start_drain = getattr(conn, "start_drain", None)
            if start_drain is not None:
                start_drain()
        if self.connections:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except asyncio.TimeoutError:
                log.info("listener %s: %d connections still open after draining %.3gs; closing them", self.name, len(self.connections), timeout)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
