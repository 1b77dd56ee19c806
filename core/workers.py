"""Worker processes: N copies of the data path sharing each listening port.

With ``workers: N`` (N > 1, or ``auto``: one per CPU), ``outrider run``
becomes the *supervisor*. It builds the configuration without binding its
listeners, and serves what is server-wide: the admin interface, the stats
sinks and the server stats. It starts N workers (``python -m outrider
worker``), each a whole single-process server less the admin and the sinks:
each binds every listener with SO_REUSEPORT, so the kernel spreads new
connections over them, and runs its own pools, access logs and tracer.

Each worker talks to the supervisor over a socket pair. The supervisor sends
the configuration it validated (so every worker runs exactly that, even if
the file changed since) and then asks for stats: the worker answers with
its counters, gauges, histogram buckets and per-host load (one JSON line).
The supervisor sums them into its own store before every admin read of the
stats and once a second for the sinks. Counters of a worker that died are
kept, so totals never go down. ``listener.<address>.worker_<i>.*`` shows how
the connections were spread, as Envoy's per-worker listener stats do.

A worker that exits on its own is started again (``server.worker_restarts``,
and a log line with its exit status). SIGTERM/SIGINT drain the workers and
then stop the supervisor; SIGUSR1 (reopen access logs) is passed on. A
worker whose supervisor has gone drains and exits by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from .stats import Counter, Gauge

if TYPE_CHECKING:  # pragma: no cover
    from .registry import Registry
    from .server import Server

log = logging.getLogger("outrider.workers")

#: How long a worker may take to build its config and bind its listeners.
START_TIMEOUT = 30.0
#: How long the supervisor waits for a worker's stats before using the last ones.
STATS_TIMEOUT = 2.0
#: Pause before starting a replacement for a worker that exited.
RESTART_DELAY = 0.5


def worker_count(setting: Any) -> int:
    """The ``workers`` setting as a number of processes."""
    if setting in (None, ""):
        return 1
    if setting == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(setting)


# -- the stats a worker reports ---------------------------------------------------


def stats_report(server: "Server") -> dict[str, Any]:
    """What a worker sends when asked for its stats."""
    counters: dict[str, int] = {}
    gauges: dict[str, int] = {}
    for stat in server.stats:
        if isinstance(stat, Counter):
            counters[stat.name] = stat.value
        else:
            gauges[stat.name] = stat.value
    histograms = {h.name: [h.counts, h.sum] for h in server.stats.histograms() if h.used}
    hosts = {
        name: [[host.address, host.active_connections, host.active_requests] for host in cluster.hosts]
        for name, cluster in server.clusters.items()
    }
    return {"counters": counters, "gauges": gauges, "histograms": histograms, "hosts": hosts}


def _own_gauge(name: str) -> bool:
    # Gauges every process derives from the config (cluster membership) or
    # that describe the supervisor itself: its own values stand.
    return name.startswith("server.") or name.endswith((".membership_total", ".membership_healthy"))


_PER_WORKER = (".downstream_cx_total", ".downstream_cx_active")


# -- the worker side ------------------------------------------------------------------


async def serve_worker(control_fd: int, registry: "Registry") -> int:
    """A worker's life: read the config from the supervisor, serve it, answer
    stats requests, drain on SIGTERM (or when the supervisor goes away)."""
    from .server import Server, StartupError

    loop = asyncio.get_running_loop()
    _stop_with_the_parent()
    parent = os.getppid()
    sock = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    size = int.from_bytes(await reader.readexactly(4), "big")
    hello = pickle.loads(await reader.readexactly(size))  # from our own supervisor: trusted
    server = Server(hello["config"], registry, config_source=hello["source"], role="worker")
    server.worker_index = hello["index"]
    try:
        await server.start()
    except StartupError as exc:
        _send(writer, {"error": str(exc)})
        await writer.drain()
        writer.close()
        log.error("worker %d: %s", hello["index"], exc)
        return 1
    _send(writer, {"ready": os.getpid()})
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_shutdown)
    if os.getppid() != parent:  # the supervisor died before the death signal was armed
        server.request_shutdown()
    loop.add_signal_handler(signal.SIGUSR1, server.reopen_access_logs)
    control = loop.create_task(_answer(reader, writer, server))
    await server.wait_stopped()
    await server.stop()  # still answering stats while draining
    control.cancel()
    writer.close()
    return 0


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: "Server") -> None:
    try:
        while line := await reader.readline():
            try:
                if json.loads(line).get("op") == "stats":
                    _send(writer, stats_report(server))
            except Exception:  # a bad request or report: log it, keep answering
                log.exception("worker %s: cannot answer %r", getattr(server, "worker_index", "?"), line[:80])
    except OSError:
        pass
    # The supervisor is gone (EOF): nobody would stop this worker; drain now.
    log.warning("worker %s: the supervisor went away; draining", getattr(server, "worker_index", "?"))
    server.request_shutdown()


def _stop_with_the_parent() -> None:
    """Linux: SIGTERM this process when its parent (the supervisor) dies,
    even if the control channel somehow did not say so."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the channel's EOF is the signal
        pass


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


# -- the supervisor side ------------------------------------------------------------


class WorkerProcess:
    """One worker as the supervisor sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()  # one conversation at a time on the channel
        self.ready = False  # started and answering
        self.report: dict[str, Any] | None = None  # the last stats it sent

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Supervisor:
    """Starts, watches, restarts and stops the workers of ``server``, and
    merges their stats into ``server.stats``."""

    def __init__(self, server: "Server", count: int, worker_args: list[str]) -> None:
        self.server = server
        self.count = count
        self.worker_args = worker_args
        self.workers = [WorkerProcess(i) for i in range(count)]
        self.stopping = False
        self.restarts = server.stats.counter("server.worker_restarts")
        self._retired_counters: dict[str, int] = {}
        self._retired_histograms: dict[str, list[Any]] = {}
        self._watchers: list[asyncio.Task[None]] = []

    # -- starting -----------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raises StartupError when one cannot start."""
        from .server import StartupError

        results = await asyncio.gather(*(self._spawn(w) for w in self.workers), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.stop(0.0)
            raise StartupError(str(failed[0])) if not isinstance(failed[0], StartupError) else failed[0]
        log.info("%d workers serving (pids %s)", self.count, ", ".join(str(w.pid) for w in self.workers))

    async def _spawn(self, worker: WorkerProcess) -> None:
        from .server import StartupError

        worker.ready = False
        parent, child = socket.socketpair()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "outrider", "worker", "--control-fd", str(child.fileno()), *self.worker_args,
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        worker.reader, worker.writer = await asyncio.open_unix_connection(sock=parent)
        message = pickle.dumps({"config": self.server.config, "source": self.server.config_source, "index": worker.index})
        async with worker.lock:
            worker.writer.write(len(message).to_bytes(4, "big") + message)
            try:
                line = await asyncio.wait_for(worker.reader.readline(), START_TIMEOUT)
            except asyncio.TimeoutError:
                worker.process.kill()
                raise StartupError(f"worker {worker.index} did not start within {START_TIMEOUT:.0f}s") from None
        reply = json.loads(line) if line else {"error": f"worker {worker.index} exited while starting"}
        if "error" in reply:
            await worker.process.wait()
            raise StartupError(reply["error"])
        worker.ready = True
        self._watchers.append(asyncio.get_running_loop().create_task(self._watch(worker)))

    async def _watch(self, worker: WorkerProcess) -> None:
        assert worker.process is not None
        status = await worker.process.wait()
        if self.stopping:
            return
        self.restarts.value += 1
        log.warning("worker %d (pid %s) exited with status %s; starting another", worker.index, worker.pid, status)
        self._retire(worker)
        while not self.stopping:
            await asyncio.sleep(RESTART_DELAY)
            if self.stopping:
                return
            try:
                await self._spawn(worker)
                log.info("worker %d restarted (pid %s)", worker.index, worker.pid)
                return
            except Exception as exc:  # keep trying: the supervisor is what keeps the port served
                log.error("worker %d could not be restarted: %s", worker.index, exc)

    def _retire(self, worker: WorkerProcess) -> None:
        """Keep what a dead worker counted, so totals never go down."""
        report, worker.report = worker.report, None
        worker.ready = False
        if worker.writer is not None:
            worker.writer.close()
        if report is None:
            return
        for name, value in report["counters"].items():
            self._retired_counters[name] = self._retired_counters.get(name, 0) + value
        for name, (counts, total) in report["histograms"].items():
            kept = self._retired_histograms.setdefault(name, [[0] * len(counts), 0.0])
            kept[0] = [a + b for a, b in zip(kept[0], counts)]
            kept[1] += total

    # -- stats ------------------------------------------------------------------

    async def collect(self) -> None:
        """Ask every worker for its stats and merge them into the server's store."""
        await asyncio.gather(*(self._ask(w) for w in self.workers))
        self._merge()

    async def _ask(self, worker: WorkerProcess) -> None:
        async with worker.lock:
            if not worker.ready or worker.writer is None or worker.reader is None or worker.writer.is_closing():
                return
            try:
                worker.writer.write(b'{"op":"stats"}\n')
                line = await asyncio.wait_for(worker.reader.readline(), STATS_TIMEOUT)
                if line:
                    worker.report = json.loads(line)
            except Exception as exc:  # a dying worker: its last report stands
                log.warning("worker %d did not report its stats (%r); using its last report", worker.index, exc)

    def _merge(self) -> None:
        store = self.server.stats
        counters = dict(self._retired_counters)
        gauges: dict[str, int] = {}
        histograms = {name: [list(c), t] for name, (c, t) in self._retired_histograms.items()}
        hosts: dict[tuple[str, str], list[int]] = {}
        memory = 0
        for worker in self.workers:
            report = worker.report
            if report is None:
                continue
            for name, value in report["counters"].items():
                counters[name] = counters.get(name, 0) + value
                if name.startswith("listener.") and name.endswith(_PER_WORKER):
                    self._per_worker(store.counter, name, worker.index, value)
            for name, value in report["gauges"].items():
                if name == "server.memory_allocated":
                    memory += value
                elif not _own_gauge(name):
                    gauges[name] = gauges.get(name, 0) + value
                if name.startswith("listener.") and name.endswith(_PER_WORKER):
                    self._per_worker(store.gauge, name, worker.index, value)
            for name, (counts, total) in report["histograms"].items():
                merged = histograms.setdefault(name, [[0] * len(counts), 0.0])
                merged[0] = [a + b for a, b in zip(merged[0], counts)]
                merged[1] += total
            for cluster, entries in report["hosts"].items():
                for address, connections, requests in entries:
                    load = hosts.setdefault((cluster, address), [0, 0])
                    load[0] += connections
                    load[1] += requests
        for name, value in counters.items():
            if not name.startswith("server."):
                store.counter(name).value = value
        for name, value in gauges.items():
            store.gauge(name).value = value
        for name, (counts, total) in histograms.items():
            histogram = store.histogram(name)
            if len(counts) == len(histogram.counts):
                histogram.counts[:] = counts
                histogram.sum = total
        for cluster in self.server.clusters.values():
            for host in cluster.hosts:
                host.active_connections, host.active_requests = hosts.get((cluster.name, host.address), (0, 0))
        self.server.workers_memory = memory

    @staticmethod
    def _per_worker(make: Any, name: str, index: int, value: int) -> None:
        # listener.<address>.downstream_cx_total -> listener.<address>.worker_<i>.downstream_cx_total
        scope, _, stat = name.rpartition(".")
        stat_object: Counter | Gauge = make(f"{scope}.worker_{index}.{stat}")
        stat_object.value = value

    # -- signals and stopping ------------------------------------------------------

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    def signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(sig)

    async def stop(self, drain_timeout: float) -> None:
        """SIGTERM every worker (each drains for up to ``drain_timeout``),
        then wait; a worker still there a little after that is killed."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        waits = [w.process.wait() for w in self.workers if w.process is not None and w.process.returncode is None]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), drain_timeout + 5.0)
            except asyncio.TimeoutError:
                log.warning("workers still running %.3gs after SIGTERM; killing them", drain_timeout + 5.0)
                self.signal_all(signal.SIGKILL)
                await asyncio.gather(*(w.process.wait() for w in self.workers if w.process is not None))
        for task in self._watchers:
            task.cancel()
        for worker in self.workers:
            if worker.writer is not None:
                worker.writer.close()
