"""The server: builds everything a config describes, runs it, stops it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from . import __version__
from .cluster import ClusterManager
from .context import BuildContext
from .http.conn_manager import HttpConnectionManager
from .listener import Listener
from .registry import Registry
from .stats import StatsGroup, StatsStore

log = logging.getLogger("outrider.server")

DRAIN_TIMEOUT = 5.0


class ServerStats(StatsGroup):
    """``server.*``"""

    GAUGES = ("live", "uptime", "concurrency")


#: Settings the config schema describes (they are the documented shape) but
#: this server does not build yet. Refusing them beats silently running
#: something else: a "tls:" block served as plain text, say. Pass this to
#: ``load_config(..., unsupported=UNSUPPORTED)``.
_OFF = (None, [], {}, False, 0)
UNSUPPORTED: tuple[tuple[tuple[str, ...], str, tuple], ...] = (
    (("workers",), "more than one worker process", (1, None)),
    (("admin", "access_log_path"), "admin access logs", _OFF),
    (("stats", "sinks"), "stats sinks", _OFF),
    (("tracing",), "tracing", _OFF),
    (("listeners", "*", "tls"), "TLS on listeners", _OFF),
    (("listeners", "*", "network_filters"), "network filters", _OFF),
    (("listeners", "*", "access_log"), "access logs", _OFF),
    (("listeners", "*", "http", "debug"), "the debug header", _OFF),
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
    """One running configuration: clusters, listeners, admin."""

    def __init__(self, config: dict[str, Any], registry: Registry, config_source: str = "<embedded default>") -> None:
        self.config = config
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

    @property
    def hook(self) -> Any:
        return self.registry.plugin_manager.hook if self.registry.plugin_manager else None

    # -- building ------------------------------------------------------------

    def build(self) -> None:
        """Instantiate clusters and listeners (no sockets yet)."""
        ctx = BuildContext(self.registry, self.stats, server=self)
        cluster_manager = ClusterManager(self.config.get("clusters", []), ctx)
        self.cluster_manager = cluster_manager
        self.clusters = cluster_manager.clusters
        for lconf in self.config.get("listeners", []):
            self.listeners.append(self._build_listener(lconf, ctx))

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
            hcm = HttpConnectionManager(
                lconf["http"], ctx, listener_name=lconf["name"],
                buffer_limit=lconf.get("per_connection_buffer_limit", 1024 * 1024),
            )
            codec = self._http_codec(lconf["http"].get("codec", "auto"), ctx)
            return Listener(lconf, "http", lambda listener: codec.server_protocol_factory(hcm, listener), self.stats)
        for key in self.registry.listener_protocols():
            if key in lconf:
                ext = self.registry.listener_protocol(key)
                assert ext is not None
                handler = ext.factory(lconf[key] or {}, ctx.for_extension(ext))
                return Listener(lconf, key, handler.protocol_factory, self.stats)
        raise StartupError(f"listener {lconf['name']!r}: no protocol block this installation can serve")

    def _http_codec(self, name: str, ctx: BuildContext) -> Any:
        # "auto" picks HTTP/1.1 today; HTTP/2 prior-knowledge sniffing joins
        # it when an http2 codec is installed.
        return http_codec(self.registry, "http1" if name == "auto" else name, ctx)

    # -- running ---------------------------------------------------------------

    async def start(self) -> None:
        from .admin import bound_port, start_admin

        self._stopped = asyncio.Event()
        self.build_or_raise()
        self._server_stats = ServerStats(self.stats.scope("server"))
        self._server_stats.live.value = 0
        try:
            for listener in self.listeners:
                await listener.start()
            admin_host, admin_port = self.config["admin"]["host"], self.config["admin"]["port"]
            self._admin_runner = await start_admin(self, admin_host, admin_port)
        except OSError as exc:
            await self._close_listeners()
            raise StartupError(f"cannot bind: {exc.strerror or exc}") from exc
        self.state = "LIVE"
        self._server_stats.live.value = 1
        self._server_stats.concurrency.value = 1
        self._tick()
        admin_host = self.config["admin"]["host"]
        admin = f"[{admin_host.strip('[]')}]" if ":" in admin_host else admin_host
        log.info("outrider %s live (config %s); admin on %s:%d", self.version, self.config_source, admin, bound_port(self._admin_runner))
        if self.hook:
            self.hook.outrider_server_started(server=self)

    def request_shutdown(self) -> None:
        """Begin a graceful stop (from a signal or the admin's /quitquitquit)."""
        if self._stopped is not None and not self._stopped.is_set():
            self._stopped.set()

    async def run(self) -> None:
        """Start, serve until asked to stop, then drain and stop."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)
        assert self._stopped is not None
        await self._stopped.wait()
        await self.stop()

    async def stop(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.state = "DRAINING"
        log.info("draining %d listeners (up to %.3gs)", len(self.listeners), drain_timeout)
        if self.hook:
            self.hook.outrider_draining(server=self)
        await asyncio.gather(*(listener.drain(drain_timeout) for listener in self.listeners))
        await self._close_listeners()
        self.cluster_manager.close()
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
            asyncio.get_running_loop().call_later(1.0, self._tick)


def http_codec(registry: Registry, name: str, ctx: BuildContext) -> Any:
    """Instantiate the ``codecs`` extension ``name``."""
    ext = registry.get("codecs", name)
    if ext is None:
        installed = ", ".join(registry.names("codecs")) or "none installed"
        raise StartupError(f"no codec extension {name!r} is installed (installed: {installed})")
    return ext.factory({}, ctx.for_extension(ext))

