"""The server: builds everything a config describes, runs it, stops it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from . import __version__
from .access_log import AccessLogs, build_access_logs
from .cluster import ClusterManager
from .context import BuildContext
from .http.conn_manager import HttpConnectionManager
from .listener import Listener
from .registry import Registry
from .sinks import SinkRunner, build_sinks
from .stats import StatsGroup, StatsStore, TagExtractor
from .tracing import HttpTracing, build_tracing
from .workers import Supervisor, worker_count

log = logging.getLogger("outrider.server")

DRAIN_TIMEOUT = 5.0


class ServerStats(StatsGroup):
    """``server.*``"""

    GAUGES = ("live", "uptime", "concurrency", "memory_allocated")


#: How often histograms close the interval the admin's /stats shows (Envoy's
#: default stats flush interval). Sinks flush on their own flush_interval.
HISTOGRAM_INTERVAL = 5.0


def memory_allocated() -> int:
    """The process's resident memory in bytes (``server.memory_allocated``):
    Python has no allocator counter as cheap as Envoy's tcmalloc one, so this
    is the resident set size from /proc/self/statm (the peak RSS where there
    is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


#: Settings the config schema describes (they are the documented shape) but
#: this server does not build yet. Refusing them beats silently running
#: something else: a "tls:" block served as plain text, say. Pass this to
#: ``load_config(..., unsupported=UNSUPPORTED)``.
_OFF = (None, [], {}, False, 0)
UNSUPPORTED: tuple[tuple[tuple[str, ...], str, tuple], ...] = (
    (("admin", "access_log_path"), "admin access logs", _OFF),
    (("listeners", "*", "tls"), "TLS on listeners", _OFF),
    (("listeners", "*", "network_filters"), "network filters", _OFF),
    (("listeners", "*", "http", "virtual_hosts", "*", "routes", "*", "route", "idle_timeout"), "route idle timeouts", _OFF),
    (("clusters", "*", "tls"), "TLS to upstreams", _OFF),
    (("clusters", "*", "discovery"), "DNS discovery", _OFF + ("static",)),
    (("clusters", "*", "health_check"), "active health checks", _OFF),
    (("clusters", "*", "outlier_detection"), "outlier detection", _OFF),
)


class StartupError(Exception):
    """The config validated but could not be put into service (a port in use,
    an extension factory that refused its config)."""


class Server:
    """One running configuration: clusters, listeners, admin.

    ``role`` is ``"single"`` (one process does everything), ``"supervisor"``
    (admin, sinks and server stats; the listeners are served by worker
    processes: see workers.py) or ``"worker"`` (listeners bound with
    SO_REUSEPORT, no admin, no sinks).
    """

    def __init__(
        self,
        config: dict[str, Any],
        registry: Registry,
        config_source: str = "<embedded default>",
        role: str = "single",
        worker_args: list[str] | None = None,
    ) -> None:
        self.config = config
        self.role = role
        #: The supervisor's worker processes (role "supervisor" only).
        self.supervisor: Supervisor | None = None
        self._worker_args = worker_args or []
        #: Memory of the workers, as they last reported it (supervisor).
        self.workers_memory = 0
        self._collecting: asyncio.Task[None] | None = None
        self.registry = registry
        self.config_source = config_source
        self.stats = StatsStore()
        self.version = __version__
        self.start_time = time.time()
        self.state = "PRE_INITIALIZING"
        self.healthcheck_failed = False
        self.pid = os.getpid()
        self.clusters: dict[str, Any] = {}
        self.listeners: list[Listener] = []
        self._admin_runner: Any = None
        self._stopped: asyncio.Event | None = None
        self._server_stats = None
        self.sinks: list[SinkRunner] = []
        #: Every listener's ``access_log:`` entries (reopened on SIGUSR1, closed on stop).
        self.access_logs: list[AccessLogs] = []
        #: GET endpoints extensions (stats sinks) serve on the admin interface.
        self.admin_endpoints: list[Any] = []
        #: The ``tracing:`` block, built; ``None`` when tracing is off.
        self.tracing: HttpTracing | None = None
        self._histograms_latched = 0.0

    @property
    def hook(self) -> Any:
        return self.registry.plugin_manager.hook if self.registry.plugin_manager else None

    # -- building ------------------------------------------------------------

    def build(self) -> None:
        """Instantiate clusters and listeners (no sockets yet)."""
        ctx = BuildContext(self.registry, self.stats, server=self)
        # First: the router's factory picks its classes by ctx.tracing.
        self.tracing = ctx.tracing = build_tracing(self.config.get("tracing"), ctx)
        cluster_manager = ClusterManager(self.config.get("clusters", []), ctx)
        self.cluster_manager = cluster_manager
        self.clusters = cluster_manager.clusters
        for lconf in self.config.get("listeners", []):
            listener = self._build_listener(lconf, ctx)
            self._attach_access_logs(listener, lconf, ctx)
            self.listeners.append(listener)
        self.stats.tag_extractor = TagExtractor.for_config(self.config)
        if self.role != "worker":  # the supervisor flushes every worker's stats
            self.sinks = build_sinks(self.config.get("stats", {}).get("sinks", ()), ctx)
            self.admin_endpoints = [e for sink in self.sinks for e in sink.admin_endpoints()]
        if self.role == "supervisor":
            count = worker_count(self.config.get("workers"))
            ephemeral = [lc["name"] for lc in self.config.get("listeners", []) if not lc.get("port")]
            if ephemeral:
                raise StartupError(
                    f"listener {ephemeral[0]!r}: port 0 cannot be shared by {count} workers; give it a port"
                )
            self.supervisor = Supervisor(self, count, self._worker_args)

    def build_or_raise(self) -> None:
        """``build``, with an extension's refusal reported as a StartupError."""
        try:
            self.build()
        except StartupError:
            raise
        except Exception as exc:
            raise StartupError(f"cannot build the configuration: {exc}") from exc

    def _build_listener(self, lconf: dict[str, Any], ctx: BuildContext) -> Listener:
        if "http" in lconf:
            if self.tracing is not None:  # server spans name the listener as their local end
                ctx = ctx.with_tracing(self.tracing.for_listener(lconf["host"], lconf["port"]))
            hcm = HttpConnectionManager(
                lconf["http"], ctx, listener_name=lconf["name"],
                buffer_limit=lconf.get("per_connection_buffer_limit", 1024 * 1024),
            )
            codec = self._http_codec(lconf["http"].get("codec", "auto"), ctx)
            listener = Listener(lconf, "http", lambda listener: codec.server_protocol_factory(hcm, listener), self.stats)
            listener.http = hcm  # the admin's /route explains its route table
            return listener
        for key in self.registry.listener_protocols():
            if key in lconf:
                ext = self.registry.listener_protocol(key)
                assert ext is not None
                handler = ext.factory(lconf[key] or {}, ctx.for_extension(ext))
                listener = Listener(lconf, key, handler.protocol_factory, self.stats)
                listener.handler = handler
                return listener
        raise StartupError(f"listener {lconf['name']!r}: no protocol block this installation can serve")

    def _http_codec(self, name: str, ctx: BuildContext) -> Any:
        # "auto" picks HTTP/1.1 today; HTTP/2 prior-knowledge sniffing joins
        # it when an http2 codec is installed.
        return http_codec(self.registry, "http1" if name == "auto" else name, ctx)

    def _attach_access_logs(self, listener: Listener, lconf: dict[str, Any], ctx: BuildContext) -> None:
        """Build the listener's ``access_log:`` entries and hand them to its
        protocol: the HTTP connection manager calls them once per finished
        stream; a listener protocol that declares ``supports_access_log``
        calls ``listener.access_log(session)`` once per connection."""
        refs = lconf.get("access_log") or []
        if not refs:
            return
        access_logs = build_access_logs(refs, ctx)
        if listener.http is not None:
            listener.http.stream_observers.append(access_logs.observe)
            listener.http.rejected_request_observers.append(access_logs.observe)
        elif getattr(listener.handler, "supports_access_log", False):
            listener.access_log = access_logs.observe
        else:
            raise StartupError(
                f"listener {listener.name!r}: its protocol ({listener.protocol}) does not write access logs; "
                "remove its access_log setting"
            )
        self.access_logs.append(access_logs)

    def reopen_access_logs(self) -> None:
        """SIGUSR1: reopen access log files (after logrotate moved them)."""
        if self.supervisor is not None:  # the workers write them
            self.supervisor.signal_all(signal.SIGUSR1)
            return
        log.info("reopening access logs")
        for access_logs in self.access_logs:
            access_logs.reopen()

    # -- running ---------------------------------------------------------------

    async def start(self) -> None:
        from .admin import bound_port, start_admin

        self._stopped = asyncio.Event()
        self.build_or_raise()
        self._server_stats = ServerStats(self.stats.scope("server"))
        self._server_stats.live.value = 0
        try:
            if self.supervisor is None:
                for listener in self.listeners:
                    await listener.start(reuse_port=self.role == "worker")
            else:
                await self.supervisor.start()
            if self.role != "worker":
                admin_host, admin_port = self.config["admin"]["host"], self.config["admin"]["port"]
                self._admin_runner = await start_admin(self, admin_host, admin_port)
        except OSError as exc:
            await self._close_listeners()
            if self.supervisor is not None:
                await self.supervisor.stop(0.0)
            raise StartupError(f"cannot bind: {exc.strerror or exc}") from exc
        self.state = "LIVE"
        self._server_stats.live.value = 1
        self._server_stats.concurrency.value = self.supervisor.count if self.supervisor is not None else 1
        self._histograms_latched = time.monotonic()
        self._tick()
        for sink in self.sinks:
            sink.start()
        if self.tracing is not None and self.supervisor is None:  # spans come from the processes serving
            self.tracing.start()
        if self._admin_runner is not None:
            admin_host = self.config["admin"]["host"]
            admin = f"[{admin_host.strip('[]')}]" if ":" in admin_host else admin_host
            log.info("outrider %s live (config %s); admin on %s:%d", self.version, self.config_source, admin, bound_port(self._admin_runner))
        # In every process that serves or supervises: a plugin may hold
        # per-process state (a worker is a process of its own).
        if self.hook:
            self.hook.outrider_server_started(server=self)

    def request_shutdown(self) -> None:
        """Begin a graceful stop (from a signal or the admin's /quitquitquit)."""
        if self._stopped is not None and not self._stopped.is_set():
            self._stopped.set()

    async def wait_stopped(self) -> None:
        """Until a shutdown is requested (after :meth:`start`)."""
        assert self._stopped is not None
        await self._stopped.wait()

    async def run(self) -> None:
        """Start, serve until asked to stop, then drain and stop."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)
        if hasattr(signal, "SIGUSR1"):
            loop.add_signal_handler(signal.SIGUSR1, self.reopen_access_logs)
        await self.wait_stopped()
        await self.stop()

    async def refresh_stats(self) -> None:
        """Bring the stats up to date before they are read (the admin calls
        this): a supervisor collects its workers' stats; otherwise a no-op."""
        if self.supervisor is not None and self.state == "LIVE":
            await self.supervisor.collect()

    async def stop(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.state = "DRAINING"
        log.info("draining %d listeners (up to %.3gs)", len(self.listeners), drain_timeout)
        if self.hook:
            self.hook.outrider_draining(server=self)
        if self.supervisor is not None:  # each worker's final report is merged, for the sinks' last flush
            await self.supervisor.stop(drain_timeout)
        await asyncio.gather(*(listener.drain(drain_timeout) for listener in self.listeners))
        await self._close_listeners()
        self.cluster_manager.close()
        for access_logs in self.access_logs:
            access_logs.close()  # after the drain: the last streams are logged
        for sink in self.sinks:
            sink.stop()
        if self.tracing is not None:
            await self.tracing.stop()  # after the drain: the last requests' spans go too
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.hook:
            self.hook.outrider_server_stopped(server=self)
        log.info("stopped")

    async def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()

    def uptime(self) -> float:
        return time.time() - self.start_time

    def _tick(self) -> None:
        # Once a second is plenty for slow-moving server gauges.
        if self._server_stats is not None and self.state != "DRAINING":
            self._server_stats.uptime.value = int(self.uptime())
            self._server_stats.memory_allocated.value = memory_allocated() + self.workers_memory
            if self.supervisor is not None and self.state == "LIVE" and (
                self._collecting is None or self._collecting.done()
            ):
                # Fresh for the sinks, and what a worker counted is at most
                # a second old should it die.
                self._collecting = asyncio.get_running_loop().create_task(self.supervisor.collect())
            if time.monotonic() - self._histograms_latched >= HISTOGRAM_INTERVAL:
                self._histograms_latched = time.monotonic()
                self.stats.latch_histograms()
            asyncio.get_running_loop().call_later(1.0, self._tick)


def http_codec(registry: Registry, name: str, ctx: BuildContext) -> Any:
    """Instantiate the ``codecs`` extension ``name``."""
    ext = registry.get("codecs", name)
    if ext is None:
        installed = ", ".join(registry.names("codecs")) or "none installed"
        raise StartupError(f"no codec extension {name!r} is installed (installed: {installed})")
    return ext.factory({}, ctx.for_extension(ext))

