"""tcp_proxy: the ``tcp:`` listener protocol, a byte pipe to one cluster.

Each accepted connection gets one upstream connection to a host of the
cluster; bytes are handed from one transport to the other as they arrive
(written at the end of the loop's batch of events: outrider.write_batch).
Flow control runs both ways (a full write buffer on one side pauses reading
on the other), half-closes are passed through, and idle or over-long
connections are closed.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable

from outrider import BuildContext, Extension, StatsGroup, hookimpl
from outrider.access_log import LogInfoDefaults
from outrider.config.units import parse_duration
from outrider.write_batch import BatchedWriter

if TYPE_CHECKING:  # pragma: no cover
    from outrider.cluster import Cluster
    from outrider.listener import Listener
    from outrider.upstream import Host


class TcpProxyStats(StatsGroup):
    """``tcp.<stat_prefix>.*``"""

    COUNTERS = (
        "downstream_cx_total",
        "downstream_cx_no_route",
        "downstream_cx_rx_bytes_total",
        "downstream_cx_tx_bytes_total",
        "downstream_flow_control_paused_reading_total",
        "downstream_flow_control_resumed_reading_total",
        "idle_timeout",
        "max_downstream_connection_duration",
        "upstream_connect_fail",
    )


class TcpProxy:
    """One ``tcp:`` block, parsed once; makes the per-connection protocols."""

    #: Each finished connection goes to ``listener.access_log`` (when set).
    supports_access_log = True

    def __init__(self, config: dict[str, Any], ctx: BuildContext) -> None:
        self.cluster_name: str = config["cluster"]
        manager = ctx.cluster_manager
        if manager is None or manager.get(self.cluster_name) is None:
            known = ", ".join(sorted(manager.clusters)) if manager is not None else ""
            raise ValueError(
                f"tcp_proxy: cluster {self.cluster_name!r} is not defined"
                f" (defined clusters: {known or 'none'})"
            )
        self.cluster_manager = manager
        self.stat_prefix: str = config.get("stat_prefix") or self.cluster_name
        self.idle_timeout = parse_duration(config.get("idle_timeout", "1h"))
        duration = config.get("max_downstream_connection_duration")
        self.max_duration = parse_duration(duration) if duration is not None else 0.0
        self.max_connect_attempts = int(config.get("max_connect_attempts", 1))
        self.stats = TcpProxyStats(ctx.stats.scope(f"tcp.{self.stat_prefix}"))
        self.log = ctx.logger

    def protocol_factory(self, listener: "Listener") -> Callable[[], asyncio.Protocol]:
        return lambda: DownstreamConnection(self, listener)


class _Side(BatchedWriter, asyncio.Protocol):
    """One socket of a proxied pair; what it reads goes to ``peer``.

    Reading pauses while there is no peer yet or while the peer's write
    buffer is above its high-water mark, so neither direction ever buffers
    more than one transport's write limit.
    """

    transport: asyncio.Transport | None
    peer: "_Side | None"

    def __init__(self) -> None:
        self.transport = None
        self.peer = None
        self.eof = False  # the remote end shut down its write side
        self.lost = False  # connection_lost has run
        self.write_full = False  # our write buffer is above the high-water mark
        self.reading_paused = False
        self.init_batched_writes(asyncio.get_running_loop())

    def update_reading(self) -> None:
        """Pause or resume reading to match the peer's state."""
        # After EOF there is nothing left to read; resuming would make the
        # transport report EOF a second time.
        if self.eof or self.lost or self.transport is None:
            return
        peer = self.peer
        pause = peer is None or peer.write_full
        if pause == self.reading_paused:
            return
        self.reading_paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # -- asyncio flow control of our own transport ----------------------

    def pause_writing(self) -> None:
        self.write_full = True
        if self.peer is not None:
            self.peer.update_reading()

    def resume_writing(self) -> None:
        self.write_full = False
        self.touch()  # the buffer drained: bytes are moving
        if self.peer is not None:
            self.peer.update_reading()

    def touch(self) -> None:
        raise NotImplementedError

    def ended(self) -> None:
        """Our remote end sent EOF: pass it on, or finish if both ended."""
        self.eof = True
        self.touch()
        peer = self.peer
        if peer is None or peer.transport is None:
            return  # downstream EOF before the upstream is there: sent on connect
        if peer.eof or peer.lost:
            self.close_pair(abort=False)
        elif peer.transport.can_write_eof():
            peer.write_eof_after_writes()
        else:
            # The peer cannot be half-closed (e.g. TLS): end the whole pipe.
            self.close_pair(abort=False)

    def close_pair(self, abort: bool) -> None:
        raise NotImplementedError


class UpstreamConnection(_Side):
    """The proxy's connection to one host of the cluster."""

    def __init__(self, downstream: "DownstreamConnection", cluster: "Cluster", host: "Host") -> None:
        super().__init__()
        self.downstream = downstream
        self.peer = downstream
        self.cluster = cluster
        self.host = host
        stats = cluster.stats
        self._rx = stats.upstream_cx_rx_bytes_total
        self._down_tx = downstream.proxy.stats.downstream_cx_tx_bytes_total

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.cluster.stats.upstream_cx_active.value += 1
        self.host.active_connections += 1
        # Connected: from here on the downstream owns this connection, even
        # if the connect await is cancelled a moment later.
        self.downstream.upstream_connected(self)

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self._rx.value += n
        self._down_tx.value += n
        down = self.downstream
        down.bytes_sent += n
        down.last_activity = down.loop.time()
        down.batched_write(data)

    def eof_received(self) -> bool:
        self.ended()
        return True  # keep the transport: we may still write to it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        stats = self.cluster.stats
        stats.upstream_cx_active.value -= 1
        stats.upstream_cx_destroy.value += 1
        self.host.active_connections -= 1
        down = self.downstream
        if not down.lost and down.transport is not None:
            # Flush what the upstream already sent, then close (Envoy's FlushWrite).
            down.closing = True
            down.close_after_writes()
        down.maybe_finished()

    def pause_writing(self) -> None:
        # The upstream is not keeping up: the client's reading pauses.
        self.downstream.proxy.stats.downstream_flow_control_paused_reading_total.value += 1
        super().pause_writing()

    def resume_writing(self) -> None:
        self.downstream.proxy.stats.downstream_flow_control_resumed_reading_total.value += 1
        super().resume_writing()

    def touch(self) -> None:
        down = self.downstream
        down.last_activity = down.loop.time()

    def close_pair(self, abort: bool) -> None:
        self.downstream.close_pair(abort)


class DownstreamConnection(LogInfoDefaults, _Side):
    """One accepted client connection; owns the session and its timers.

    It is also what the listener's access logs receive (an
    ``outrider.access_log.AccessLogInfo``): bytes each way, start time,
    upstream host and cluster, response flags (UH, UF, UO, NC).
    """

    _logged = False

    def __init__(self, proxy: TcpProxy, listener: "Listener") -> None:
        super().__init__()
        self.proxy = proxy
        self.listener = listener
        self.start_time = time.monotonic()
        self.upstream_cluster = proxy.cluster_name
        self.loop = asyncio.get_running_loop()
        self.peer: UpstreamConnection | None = None
        self.closing = False
        self.last_activity = 0.0
        self.buffer_limit = 0
        # Bytes read before the upstream connected (reading is paused then,
        # so this stays tiny; it is bounded by the cluster's buffer_limit).
        self._early: list[bytes] | None = None
        self._early_size = 0
        self._connect_task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._duration_timer: asyncio.TimerHandle | None = None
        stats = proxy.stats
        self._rx = stats.downstream_cx_rx_bytes_total
        self._up_tx: Any = None

    # -- downstream transport events ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.listener.connection_opened(self):
            self.closing = True
            transport.abort()  # type: ignore[attr-defined]
            return
        proxy = self.proxy
        proxy.stats.downstream_cx_total.value += 1
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote_ip, self.remote_port = peer[0], peer[1]
        # Hold the client's bytes in its socket until there is somewhere to send them.
        self.update_reading()
        cluster = proxy.cluster_manager.get(proxy.cluster_name)
        if cluster is None:  # only after a reload removed it
            proxy.stats.downstream_cx_no_route.value += 1
            self.response_flags += ("NC",)
            self.close_pair(abort=False)
            return
        if cluster.stats.upstream_cx_active.value >= cluster.max_connections:
            # The cluster's max_connections circuit breaker is open.
            cluster.stats.upstream_cx_overflow.value += 1
            self.response_flags += ("UO",)
            self.close_pair(abort=False)
            return
        self.buffer_limit = cluster.buffer_limit
        self._up_tx = cluster.stats.upstream_cx_tx_bytes_total
        # Envoy's per-connection buffer limit is the high-water mark of each
        # side's write buffer: the most either direction holds in memory.
        self.transport.set_write_buffer_limits(high=self.buffer_limit)
        self.last_activity = self.loop.time()
        if proxy.idle_timeout > 0:
            self._idle_timer = self.loop.call_later(proxy.idle_timeout, self._on_idle_timer)
        if proxy.max_duration > 0:
            self._duration_timer = self.loop.call_later(proxy.max_duration, self._on_max_duration)
        self._connect_task = self.loop.create_task(self._connect(cluster))

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self._rx.value += n
        self._up_tx.value += n
        self.bytes_received += n
        self.last_activity = self.loop.time()
        up = self.peer
        if up is not None:
            up.batched_write(data)
            return
        # Reading was paused in connection_made; this is what was already in flight.
        if self._early is None:
            self._early = []
        self._early.append(data)
        self._early_size += n
        if self._early_size > self.buffer_limit:
            self.proxy.log.warning(
                "tcp %s: %d bytes arrived before the upstream connected (limit %d); closing",
                self.proxy.stat_prefix, self._early_size, self.buffer_limit,
            )
            self.close_pair(abort=True)

    def eof_received(self) -> bool:
        self.ended()
        return True  # keep the transport: the upstream may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self._cancel_connect()
        up = self.peer
        if up is not None and not up.lost and up.transport is not None:
            up.close_after_writes()
        self.listener.connection_closed(self)
        self.maybe_finished()

    def touch(self) -> None:
        self.last_activity = self.loop.time()

    # -- the listener's connection contract -------------------------------

    def start_drain(self) -> None:
        """Nothing to do: a TCP session ends when its peers end it; the
        listener closes whatever is left after its drain timeout."""

    def close(self) -> None:
        """Close both sides (pending writes are flushed first)."""
        self.close_pair(abort=False)

    # -- the upstream --------------------------------------------------

    async def _connect(self, cluster: "Cluster") -> None:
        proxy = self.proxy
        stats = cluster.stats
        attempts = 0
        while True:
            host = cluster.choose_host(None)
            if host is None:
                stats.upstream_cx_none_healthy.value += 1
                self.response_flags += ("UH",)
                proxy.log.warning("tcp %s: cluster %s has no healthy host; closing the connection", proxy.stat_prefix, cluster.name)
                break
            attempts += 1
            stats.upstream_cx_total.value += 1
            self.upstream_host = host.address
            timeout = cluster.connect_timeout
            timed_out = False
            try:
                await asyncio.wait_for(
                    self.loop.create_connection(lambda: UpstreamConnection(self, cluster, host), host.host, host.port),
                    timeout,
                )
                return
            # TimeoutError is an OSError subclass: it has to come first.
            except TimeoutError:
                timed_out = True
                reason = f"timed out after {timeout:.3g}s"
            except OSError as exc:
                reason = exc.strerror or str(exc)
            except Exception as exc:  # e.g. a malformed address: still a failed connect, not a stuck client
                reason = repr(exc)
            if self.peer is not None:
                return  # it did connect before the timeout hit; connection_lost takes it from here
            if timed_out:
                stats.upstream_cx_connect_timeout.value += 1
            stats.upstream_cx_connect_fail.value += 1
            proxy.log.warning(
                "tcp %s: connect to cluster %s host %s failed: %s (attempt %d of %d)",
                proxy.stat_prefix, cluster.name, host.address, reason, attempts, proxy.max_connect_attempts,
            )
            if attempts >= proxy.max_connect_attempts:
                stats.scope.counter("upstream_cx_connect_attempts_exceeded").value += 1
                self.response_flags += ("UF", "URX")  # as Envoy: the connect failed, no attempt is left
                break
        proxy.stats.upstream_connect_fail.value += 1
        self._connect_task = None  # so close_pair does not cancel the running task
        self.close_pair(abort=False)

    def upstream_connected(self, up: UpstreamConnection) -> None:
        """``up`` finished its handshake: start the pipe."""
        if self.closing or self.lost:
            up.transport.abort()  # type: ignore[union-attr]
            return
        self.peer = up
        up.transport.set_write_buffer_limits(high=self.buffer_limit)  # type: ignore[union-attr]
        self.last_activity = self.loop.time()
        if self._early is not None:
            # Joined once: one write, one syscall.
            up.batched_write(b"".join(self._early))
            self._early = None
            self._early_size = 0
        if self.eof:
            self.ended()  # the client already half-closed: pass it on now
        self.update_reading()
        up.update_reading()

    def _cancel_connect(self) -> None:
        task = self._connect_task
        self._connect_task = None
        if task is not None and not task.done():
            task.cancel()

    # -- ending the session --------------------------------------------

    def close_pair(self, abort: bool) -> None:
        """Close both sides; ``abort`` drops unsent bytes (timeouts)."""
        self.closing = True
        self._cancel_connect()
        for side in (self, self.peer):
            if side is not None and side.transport is not None and not side.lost:
                if abort:
                    side.transport.abort()
                else:
                    side.close_after_writes()

    def maybe_finished(self) -> None:
        """Both sockets are gone: drop the timers, write the access log."""
        if not self.lost or (self.peer is not None and not self.peer.lost):
            return
        for timer in (self._idle_timer, self._duration_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._duration_timer = None
        access_log = self.listener.access_log
        if access_log is not None and not self._logged:
            self._logged = True
            access_log(self)

    def _on_idle_timer(self) -> None:
        # One timer per connection, re-armed lazily: data_received only
        # stores a timestamp instead of rescheduling a timer per chunk.
        remaining = self.last_activity + self.proxy.idle_timeout - self.loop.time()
        if remaining > 0:
            self._idle_timer = self.loop.call_later(remaining, self._on_idle_timer)
            return
        self._idle_timer = None
        self.proxy.stats.idle_timeout.value += 1
        self.proxy.log.debug("tcp %s: connection idle for %.3gs; closing", self.proxy.stat_prefix, self.proxy.idle_timeout)
        self.close_pair(abort=True)

    def _on_max_duration(self) -> None:
        self._duration_timer = None
        self.proxy.stats.max_downstream_connection_duration.value += 1
        self.close_pair(abort=True)


def create(config: dict[str, Any], ctx: BuildContext) -> TcpProxy:
    return TcpProxy(config, ctx)


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="tcp_proxy",
            category="filters.network",
            listener_protocol="tcp",
            factory=create,
            status="stable",
            security_posture="robust_to_untrusted_downstream",
            description="Proxies raw TCP to a cluster, with flow control, half-close, idle and duration limits.",
        )
    )
