"""Worker processes: N copies of the data path sharing each listening port.

With ``workers: N`` (N > 1, or ``auto``: one per CPU), ``outrider run``
becomes the *supervisor*. It builds the configuration without binding its
listeners, and serves what is server-wide: the admin interface, the stats
sinks and the server stats. It starts N workers (``python -m outrider
worker``), each a whole single-process server less the admin and the sinks:
each binds every listener with SO_REUSEPORT, so the kernel spreads new
connections over them, and runs its own pools, access logs and tracer.

Each worker talks to the supervisor over a socket pair (the frames are
described below). The supervisor sends the configuration it validated (so
every worker runs exactly that, even if the file changed since) and then
asks for stats: the worker answers with its counters, gauges, histogram
buckets and per-host load. The supervisor sums them into its own store
before every admin read of the stats and once a second (for the sinks, and
so that a worker that dies has counted at most a second unseen). Counters of
a worker that died are kept, so totals never go down; each worker's last
report after it drained is merged too. ``listener.<address>.worker_<i>.*``
shows how the connections were spread, as Envoy's per-worker listener stats
do.

A worker that exits on its own, or misses three stats requests in a row
(it is killed), is started again (``server.worker_restarts``, and a log
line with its exit status). SIGTERM/SIGINT drain the workers and then stop
the supervisor; SIGUSR1 (reopen access logs) is passed on. A worker whose
supervisor has gone drains and exits by itself.
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


# -- the control channel ------------------------------------------------------------
#
# Frames both ways: a 4-byte big-endian length, then the payload. The
# supervisor's first frame is the pickled configuration (trusted: our own
# process); every other frame is JSON. Worker to supervisor: {"ready": pid}
# or {"error": message} once; then {"seq": n, "report": {...}} for each
# {"op": "stats", "seq": n}; and a last {"final": true, "report": {...}}
# after it drained, so that nothing it counted is lost.

#: Larger than any sane report (a few KiB per cluster); guards against garbage.
MAX_FRAME = 64 * 1024 * 1024


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(_frame(json.dumps(message, separators=(",", ":")).encode()))


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_FRAME:
        raise ValueError(f"control frame of {size} bytes")
    return await reader.readexactly(size)


# -- the worker side ------------------------------------------------------------------


async def serve_worker(control_fd: int, supervisor_pid: int, registry: "Registry") -> int:
    """A worker's life: read the config from the supervisor, serve it, answer
    stats requests, drain on SIGTERM (or when the supervisor goes away)."""
    from .server import Server, StartupError

    loop = asyncio.get_running_loop()
    _stop_with_the_parent()
    if os.getppid() != supervisor_pid:  # it died before the death signal was armed
        return 0
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=control_fd))
    hello = pickle.loads(await _read_frame(reader))
    index = hello["index"]
    server = Server(hello["config"], registry, config_source=hello["source"], role="worker")
    server.worker_index = index
    try:
        await server.start()
    except StartupError as exc:
        _send(writer, {"error": str(exc)})
        await writer.drain()
        writer.close()
        log.error("worker %d: %s", index, exc)
        return 1
    _send(writer, {"ready": os.getpid()})
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_shutdown)
    loop.add_signal_handler(signal.SIGUSR1, server.reopen_access_logs)
    control = loop.create_task(_answer(reader, writer, server, index))
    await server.wait_stopped()
    await server.stop()  # still answering stats while draining
    control.cancel()
    try:
        _send(writer, {"final": True, "report": stats_report(server)})
        await asyncio.wait_for(writer.drain(), 5.0)
    except (OSError, asyncio.TimeoutError):
        pass  # the supervisor is gone: nobody to tell
    writer.close()
    return 0


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: "Server", index: int) -> None:
    try:
        while True:
            request = json.loads(await _read_frame(reader))
            if request.get("op") == "stats":
                _send(writer, {"seq": request.get("seq"), "report": stats_report(server)})
    except (asyncio.IncompleteReadError, OSError, ValueError) as exc:
        if not isinstance(exc, asyncio.IncompleteReadError):
            log.error("worker %d: control channel broken: %r", index, exc)
    # The supervisor is gone (EOF): nobody would stop this worker; drain now.
    log.warning("worker %d: the supervisor went away; draining", index)
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


# -- the supervisor side ------------------------------------------------------------

#: Stats requests a worker may miss in a row before it is killed (and replaced).
MAX_MISSED = 3


class WorkerProcess:
    """One worker as the supervisor sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = False  # started and answering
        self.report: dict[str, Any] | None = None  # the last stats it sent
        self.seq = 0
        self.missed = 0
        #: Stats requests sent, by sequence number, until their reply is read.
        self.pending: dict[int, asyncio.Future[None]] = {}
        #: Reads every frame the worker sends (reads are never cancelled
        #: half-way, so a late reply cannot put the channel out of step).
        self.reading: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def close_channel(self) -> None:
        self.ready = False
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


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
        self._per_worker_gauges: set[str] = set()
        self._watchers: list[asyncio.Task[None]] = []

    # -- starting -----------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raises StartupError when one cannot start."""
        from .server import StartupError

        results = await asyncio.gather(*(self._spawn(w) for w in self.workers), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.stop(0.0)
            raise failed[0] if isinstance(failed[0], StartupError) else StartupError(str(failed[0]))
        log.info("%d workers serving (pids %s)", self.count, ", ".join(str(w.pid) for w in self.workers))

    async def _spawn(self, worker: WorkerProcess) -> None:
        from .server import StartupError

        worker.ready = False
        parent, child = socket.socketpair()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "outrider", "worker", "--control-fd", str(child.fileno()),
                "--supervisor-pid", str(os.getpid()), *self.worker_args,
                pass_fds=(child.fileno(),),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        worker.reader, worker.writer = await asyncio.open_unix_connection(sock=parent)
        hello = pickle.dumps({"config": self.server.config, "source": self.server.config_source, "index": worker.index})
        worker.writer.write(_frame(hello))
        try:
            reply = json.loads(await asyncio.wait_for(_read_frame(worker.reader), START_TIMEOUT))
        except asyncio.TimeoutError:
            reply = {"error": f"worker {worker.index} did not start within {START_TIMEOUT:.0f}s"}
            worker.process.kill()
        except (asyncio.IncompleteReadError, OSError, ValueError):
            reply = {"error": f"worker {worker.index} exited while starting"}
        if "error" in reply:
            worker.close_channel()
            await worker.process.wait()
            raise StartupError(reply["error"])
        if self.stopping:  # stop() began while this one was starting: it missed the SIGTERM
            worker.process.send_signal(signal.SIGTERM)
        worker.ready = True
        worker.missed = 0
        loop = asyncio.get_running_loop()
        worker.reading = loop.create_task(self._read_reports(worker, worker.reader))
        self._watchers.append(loop.create_task(self._watch(worker)))

    async def _read_reports(self, worker: WorkerProcess, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = json.loads(await _read_frame(reader))
                if "report" in message:
                    worker.report = message["report"]
                answered = worker.pending.pop(message.get("seq"), None)
                if answered is not None and not answered.done():
                    answered.set_result(None)
        except (asyncio.IncompleteReadError, OSError, ValueError):
            pass  # the worker exited (EOF) or its channel broke: _watch takes over
        finally:
            worker.ready = False
            for waiting in worker.pending.values():
                if not waiting.done():
                    waiting.set_result(None)
            worker.pending.clear()

    async def _watch(self, worker: WorkerProcess) -> None:
        assert worker.process is not None
        pid = worker.pid
        status = await worker.process.wait()
        await self._retire(worker)
        if self.stopping:
            return
        await asyncio.sleep(RESTART_DELAY)  # a Ctrl-C reaches the workers first: wait for the supervisor's
        if self.stopping:
            return
        self.restarts.value += 1
        log.warning("worker %d (pid %s) exited with status %s; starting another", worker.index, pid, status)
        while not self.stopping:
            try:
                await self._spawn(worker)
                log.info("worker %d restarted (pid %s)", worker.index, worker.pid)
                return
            except Exception as exc:  # keep trying: the supervisor is what keeps the port served
                log.error("worker %d could not be restarted: %s", worker.index, exc)
                await asyncio.sleep(5.0)

    async def _retire(self, worker: WorkerProcess) -> None:
        """A worker exited: read what it said last (its final report, when it
        drained), and keep what it counted, so totals never go down."""
        worker.ready = False
        if worker.reading is not None:  # it ends at the channel's EOF, after the last frame
            await asyncio.wait([worker.reading], timeout=2.0)
            worker.reading.cancel()
            worker.reading = None
        worker.close_channel()
        report, worker.report = worker.report, None
        if report is not None:
            _add_counts(report, worker.index, self._retired_counters, self._retired_histograms)

    # -- stats ------------------------------------------------------------------

    async def collect(self) -> None:
        """Ask every worker for its stats and merge them into the server's store."""
        await asyncio.gather(*(self._ask(w) for w in self.workers))
        self._merge()

    async def _ask(self, worker: WorkerProcess) -> None:
        if not worker.ready or worker.writer is None:
            return
        worker.seq += 1
        seq = worker.seq
        answered = worker.pending[seq] = asyncio.get_running_loop().create_future()
        try:
            _send(worker.writer, {"op": "stats", "seq": seq})
            await asyncio.wait_for(asyncio.shield(answered), STATS_TIMEOUT)
            worker.missed = 0
        except asyncio.TimeoutError:
            worker.pending.pop(seq, None)
            worker.missed += 1
            log.warning("worker %d did not report its stats within %.3gs (%d in a row)", worker.index, STATS_TIMEOUT, worker.missed)
            if worker.missed >= MAX_MISSED and worker.process is not None and worker.process.returncode is None:
                log.error("worker %d (pid %s) stopped answering; killing it", worker.index, worker.pid)
                worker.process.kill()  # _watch starts another
        except OSError as exc:  # it is exiting: _watch takes over
            worker.pending.pop(seq, None)
            log.info("worker %d: no stats (%r)", worker.index, exc)

    def _merge(self) -> None:
        store = self.server.stats
        counters = dict(self._retired_counters)
        gauges: dict[str, int] = {name: 0 for name in self._per_worker_gauges}
        histograms = {name: [list(c), t] for name, (c, t) in self._retired_histograms.items()}
        hosts: dict[tuple[str, str], list[int]] = {}
        memory = 0
        for worker in self.workers:
            report = worker.report
            if report is None:
                continue
            _add_counts(report, worker.index, counters, histograms)
            for name, value in report["gauges"].items():
                if name == "server.memory_allocated":
                    memory += value
                elif not _own_gauge(name):
                    gauges[name] = gauges.get(name, 0) + value
                if name.startswith("listener.") and name.endswith(_PER_WORKER):
                    per_worker = _per_worker_name(name, worker.index)
                    self._per_worker_gauges.add(per_worker)
                    gauges[per_worker] = value
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

    # -- signals and stopping ------------------------------------------------------

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None and w.ready]

    def signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(sig)

    async def stop(self, drain_timeout: float) -> None:
        """SIGTERM every worker (each drains for up to ``drain_timeout`` and
        sends its final report), wait, then merge what they said last; a
        worker still there a little after that is killed."""
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
        if self._watchers:  # each retires its worker (reads its final report) and returns
            await asyncio.wait(self._watchers, timeout=5.0)
        for worker in self.workers:
            worker.close_channel()
        self._merge()


def _add_counts(
    report: dict[str, Any], index: int, counters: dict[str, int], histograms: dict[str, list[Any]]
) -> None:
    """Add worker ``index``'s counters (and their per-worker copies) and
    histogram buckets from ``report`` to the running sums."""
    for name, value in report["counters"].items():
        counters[name] = counters.get(name, 0) + value
        if name.startswith("listener.") and name.endswith(_PER_WORKER):
            per_worker = _per_worker_name(name, index)
            counters[per_worker] = counters.get(per_worker, 0) + value
    for name, (counts, total) in report["histograms"].items():
        summed = histograms.setdefault(name, [[0] * len(counts), 0.0])
        summed[0] = [a + b for a, b in zip(summed[0], counts)]
        summed[1] += total


def _per_worker_name(name: str, index: int) -> str:
    # listener.<address>.downstream_cx_total -> listener.<address>.worker_<i>.downstream_cx_total
    scope, _, stat = name.rpartition(".")
    return f"{scope}.worker_{index}.{stat}"
