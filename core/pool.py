"""Upstream connection pools: keep-alive reuse, pending queue, idle timeout.

A pool belongs to one (cluster, host, codec). The codec supplies the
connection protocol; the pool only decides when to connect, reuse and close.
``acquire`` answers synchronously when an idle connection is at hand, so the
common keep-alive case costs no task and no future.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from .cluster import Cluster
    from .upstream import Host

log = logging.getLogger("outrider.pool")


class PoolWaiter(Protocol):
    """Who asks the pool for a connection (the router's upstream request)."""

    def on_pool_ready(self, connection: Any) -> None: ...

    def on_pool_failure(self, reason: str, detail: str) -> None:
        """``reason``: ``connect_failure``, ``connect_timeout``, ``overflow``."""


class PooledConnection(Protocol):
    """What a codec's client protocol offers the pool."""

    def is_reusable(self) -> bool: ...

    def close(self) -> None: ...


class ConnectionPool:
    def __init__(self, cluster: "Cluster", host: "Host", make_protocol: Callable[["ConnectionPool"], Any]) -> None:
        self.cluster = cluster
        self.host = host
        self._make_protocol = make_protocol
        self._idle: list[Any] = []
        # When each idle connection went idle (loop time), oldest first. One
        # sweep timer closes the expired ones: no timer per request.
        self._idle_since: dict[Any, float] = {}
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._waiters: deque[PoolWaiter] = deque()
        self._connecting = 0
        self._connections: set[Any] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- asking for a connection -----------------------------------------

    def acquire(self, waiter: PoolWaiter) -> bool:
        """Hand ``waiter`` a connection now (True) or later (False: it is
        queued and will get ``on_pool_ready`` or ``on_pool_failure``)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            del self._idle_since[conn]
            if conn.is_reusable():
                waiter.on_pool_ready(conn)
                return True
            conn.close()
        cluster = self.cluster
        stats = cluster.stats
        if len(self._waiters) >= cluster.max_pending_requests:
            stats.upstream_rq_pending_overflow.value += 1
            waiter.on_pool_failure("overflow", "too many requests waiting for a connection")
            return True
        stats.upstream_rq_pending_total.value += 1
        stats.upstream_rq_pending_active.value += 1
        self._waiters.append(waiter)
        if self._connecting < len(self._waiters):
            if stats.upstream_cx_active.value + self._connecting >= cluster.max_connections:
                stats.upstream_cx_overflow.value += 1
            else:
                self._connect()
        return False

    def cancel(self, waiter: PoolWaiter) -> None:
        """``waiter`` no longer wants a connection (its request went away)."""
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self.cluster.stats.upstream_rq_pending_active.value -= 1

    # -- connections coming and going ------------------------------------

    def _connect(self) -> None:
        self._connecting += 1
        self.cluster.stats.upstream_cx_total.value += 1
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        cluster = self.cluster
        stats = cluster.stats
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: self._make_protocol(self), self.host.host, self.host.port),
                cluster.connect_timeout,
            )
        except asyncio.TimeoutError:
            self._connecting -= 1
            stats.upstream_cx_connect_timeout.value += 1
            stats.upstream_cx_connect_fail.value += 1
            log.warning("cluster %s: connect to %s timed out after %.3gs", cluster.name, self.host.address, cluster.connect_timeout)
            self._fail_one("connect_timeout", f"connect to {self.host.address} timed out")
            return
        except (OSError, socket.gaierror) as exc:
            self._connecting -= 1
            stats.upstream_cx_connect_fail.value += 1
            log.warning("cluster %s: connect to %s failed: %s", cluster.name, self.host.address, exc.strerror or exc)
            self._fail_one("connect_failure", f"connect to {self.host.address} failed: {exc.strerror or exc}")
            return
        self._connecting -= 1
        if self._closed:
            protocol.close()
            return
        self._connections.add(protocol)
        self.release(protocol)

    def _fail_one(self, reason: str, detail: str) -> None:
        if self._waiters:
            waiter = self._waiters.popleft()
            self.cluster.stats.upstream_rq_pending_active.value -= 1
            waiter.on_pool_failure(reason, detail)

    def connection_opened(self, conn: Any) -> None:
        """Called by the codec's protocol from ``connection_made``."""
        self.cluster.stats.upstream_cx_active.value += 1
        self.host.active_connections += 1

    def release(self, conn: Any) -> None:
        """A connection finished its request and may be reused."""
        if self._closed or not conn.is_reusable():
            conn.close()
            return
        if self._waiters:
            waiter = self._waiters.popleft()
            self.cluster.stats.upstream_rq_pending_active.value -= 1
            waiter.on_pool_ready(conn)
            return
        loop = self._loop
        if loop is None:  # asking once: get_running_loop() costs a getpid()
            loop = self._loop = asyncio.get_running_loop()
        self._idle.append(conn)
        self._idle_since[conn] = now = loop.time()
        if self._sweep_timer is None:
            self._sweep_timer = loop.call_at(now + self.cluster.idle_timeout, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._sweep_timer = None
        timeout = self.cluster.idle_timeout
        now = self._loop.time()  # type: ignore[union-attr]
        for conn, since in list(self._idle_since.items()):
            if since + timeout > now:
                self._sweep_timer = self._loop.call_at(since + timeout, self._sweep_idle)  # type: ignore[union-attr]
                return
            del self._idle_since[conn]
            self._idle.remove(conn)
            self.cluster.stats.upstream_cx_idle_timeout.value += 1
            conn.close()

    def connection_closed(self, conn: Any) -> None:
        """Called by the codec's protocol from ``connection_lost``."""
        stats = self.cluster.stats
        if conn in self._connections:
            self._connections.discard(conn)
        stats.upstream_cx_active.value -= 1
        stats.upstream_cx_destroy.value += 1
        self.host.active_connections -= 1
        if self._idle_since.pop(conn, None) is not None:
            self._idle.remove(conn)
        # Waiters queued behind this connection's capacity may now connect.
        if self._waiters and self._connecting < len(self._waiters) and not self._closed:
            if stats.upstream_cx_active.value + self._connecting < self.cluster.max_connections:
                self._connect()

    def close(self) -> None:
        self._closed = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        self._idle_since.clear()
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()
        while self._waiters:
            self._fail_one("connect_failure", "cluster removed")

    @property
    def idle_count(self) -> int:
        return len(self._idle)
