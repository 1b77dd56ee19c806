"""file: access log lines to a file, /dev/stdout or /dev/stderr.

When a stream ends, the logger only captures what its format needs (a
tuple of references: the request and response heads, counters, the end
time). The lines are rendered on the event loop every 64 streams, in one
loop, and at each flush. Writing never happens on the loop: lines collect
in a list, which is joined and handed every ``flush_interval`` (or every
16384 lines) to a writer thread as one batch of bytes; the thread writes it
with one ``os.write`` loop. The bytes waiting for the thread are
bounded (``max_buffer_bytes``): beyond that, lines are dropped and counted.
A file that cannot be opened or written costs a stat and a rate-limited log
line; the proxy keeps serving. SIGUSR1 reopens the file (log rotation).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Callable

from outrider import BuildContext, Extension, StatsGroup, hookimpl
from outrider.access_log import DeferredFormat, compile_deferred_format, compile_deferred_json_format
from outrider.config.units import parse_duration
from outrider.sinks import RateLimitedLog

log = logging.getLogger("outrider.ext.file")

#: Lines held on the loop before a batch is handed over, whatever the interval.
#: Few, large batches matter: each one makes the writer thread take the GIL
#: a couple of times, and a thread waiting for the GIL while the loop is busy
#: is woken (a futex call on each side) every time the loop releases it.
FLUSH_LINES = 16384
#: Streams captured before their lines are rendered, in one loop while the
#: format's code is hot in the CPU caches: rendering each line as its stream
#: ends cost about three times more under load (bench/RESULTS.md). Each
#: capture holds its stream's request and response heads until then; 32 and
#: 256 measured the same, 2048 twice the cost.
RENDER_LINES = 64
#: At most one log line per problem kind per this many seconds.
ERROR_LOG_INTERVAL = 10.0


class FileAccessLogStats(StatsGroup):
    """``access_logs.file.*`` (shared by every file access log)."""

    COUNTERS = (
        "write_buffered",    # lines accepted
        "write_completed",   # batches written
        "write_failed",      # failed opens and writes
        "dropped",           # lines lost: buffer full, or the open/write failed
        "flushed_by_timer",  # batches handed over by the flush_interval timer
        "reopen_failed",     # SIGUSR1 reopens that failed
    )
    GAUGES = ("write_total_buffered",)  # bytes waiting for the writer thread


class _Writer:
    """One file, shared by every file access log that names its path: the
    loop-side buffer and the writer thread behind it.

    The loop joins and encodes each batch (one join per batch), so the
    thread's only work is ``os.write``: it takes the GIL about twice per
    batch, which keeps what the loop pays for the hand-over small. The
    thread's counts are plain integers only it writes; the loop folds them
    into the stats (a callback the thread schedules after each round).
    """

    def __init__(self, path: str, stats: FileAccessLogStats, flush_interval: float, max_bytes: int) -> None:
        self.path = path
        self.stats = stats
        self.flush_interval = flush_interval
        self.max_bytes = max_bytes
        #: Each logger's render_held: renders what it captured into pending.
        self.renderers: list[Callable[[], None]] = []
        #: [captures a logger holds before rendering them]: one shared list
        #: so that loggers writing one file render each line at once, which
        #: keeps the file's lines in the order their streams ended.
        self.render_at = [RENDER_LINES]
        #: Lines formatted on the loop, not yet handed to the thread.
        self.pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log_drop = RateLimitedLog(log, ERROR_LOG_INTERVAL)
        # Shared with the thread, under _cond: (data, lines) batches.
        self._cond = threading.Condition()
        self._batches: list[tuple[bytes, int]] = []
        self._queued_bytes = 0
        self._reopen = False
        self._closing = False
        self._thread: threading.Thread | None = None
        # Written by the thread only, read by the loop (see _sync).
        self._done = {"write_completed": 0, "write_failed": 0, "dropped": 0, "reopen_failed": 0}
        self._synced = dict(self._done)
        # Thread-only state:
        self._fd: int | None = None
        # One rate limit per kind of problem, so one does not hide another.
        self._log_open = RateLimitedLog(log, ERROR_LOG_INTERVAL)
        self._log_write = RateLimitedLog(log, ERROR_LOG_INTERVAL)

    # -- on the event loop ---------------------------------------------------

    def attach(self, render_held: Callable[[], None]) -> None:
        """A logger of this file: flushes render what it holds."""
        self.renderers.append(render_held)
        self._set_render_at()

    def detach(self, render_held: Callable[[], None]) -> None:
        self.renderers.remove(render_held)
        self._set_render_at()

    def _set_render_at(self) -> None:
        # Loggers sharing the file render each line at once (line order).
        self.render_at[0] = RENDER_LINES if len(self.renderers) <= 1 else 1

    def schedule(self) -> None:
        """Something is held: flush it within flush_interval."""
        if self._timer is not None:
            return
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (an embedding app calling log directly)
                self.flush()
                return
        self._timer = loop.call_later(self.flush_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._render_held()
        if self.pending:
            self.stats.flushed_by_timer.value += 1
            self.flush()

    def _render_held(self) -> None:
        for render_held in self.renderers:
            render_held()

    def flush(self) -> None:
        """Hand the pending lines to the writer thread as one batch."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._render_held()
        pending = self.pending
        if pending:
            count = len(pending)
            text = "".join(pending)
            pending.clear()  # the list stays: loggers hold its append
            try:
                # Header values are latin-1 views of the wire bytes: written back as those bytes.
                data = text.encode("latin-1")
            except UnicodeEncodeError:
                data = text.encode("utf-8", "replace")
            self._hand_over(data, count)
        self._sync()

    def _hand_over(self, data: bytes, count: int) -> None:
        stats = self.stats
        stats.write_buffered.value += count
        with self._cond:
            if self._queued_bytes + len(data) > self.max_bytes:
                stats.dropped.value += count
                self._log_drop(logging.WARNING, "access log %s: %d bytes are waiting for the disk (max_buffer_bytes %d); "
                               "dropping %d lines", self.path, self._queued_bytes, self.max_bytes, count)
                return
            self._batches.append((data, count))
            self._queued_bytes += len(data)
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"access-log {self.path}", daemon=True)
            self._thread.start()

    def _sync(self) -> None:
        """Fold the thread's counts into the stats (on the loop, which owns them)."""
        stats = self.stats
        done, synced = self._done, self._synced
        for name, value in done.items():
            delta = value - synced[name]
            if delta:
                synced[name] = value
                getattr(stats, name).value += delta
        stats.write_total_buffered.value = self._queued_bytes

    def reopen(self) -> None:
        if self.path in _STD_STREAMS:
            return
        with self._cond:
            self._reopen = True
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending and stop the thread (bounded wait)."""
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("access log %s: the writer did not finish within %.3gs", self.path, timeout)
        self._sync()

    # -- the writer thread ---------------------------------------------------

    def _run(self) -> None:
        done = self._done
        while True:
            with self._cond:
                while not self._batches and not self._reopen and not self._closing:
                    self._cond.wait()
                batches, self._batches = self._batches, []
                reopen, self._reopen = self._reopen, False
                closing = self._closing
            if reopen:
                self._close_fd()
                if not self._open():
                    done["reopen_failed"] += 1
            if batches:
                for data, count in batches:
                    self._write(data, count)
                with self._cond:
                    self._queued_bytes -= sum(len(data) for data, _ in batches)
            # The stats (and the failures) show now, not at the next flush:
            # one loop callback per round of batches.
            self._sync_soon()
            if closing:
                with self._cond:
                    if self._batches:
                        continue
                self._close_fd()
                return

    def _sync_soon(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._sync)
            except RuntimeError:  # the loop closed meanwhile; close() syncs
                pass

    def _open(self) -> bool:
        try:
            if self.path in _STD_STREAMS:
                self._fd = os.dup(_STD_STREAMS[self.path])
            else:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            return True
        except OSError as exc:
            self._done["write_failed"] += 1
            self._log_open(logging.ERROR, "access log: cannot open %s: %s", self.path, exc.strerror or exc)
            return False

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _write(self, data: bytes, count: int) -> None:
        done = self._done
        if self._fd is None and not self._open():
            done["dropped"] += count
            return
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)  # type: ignore[arg-type]
                view = view[written:]
        except OSError as exc:
            done["write_failed"] += 1
            done["dropped"] += count
            self._log_write(logging.ERROR, "access log: cannot write to %s: %s; %d lines lost", self.path, exc.strerror or exc, count)
            self._close_fd()  # opened again for the next batch
            return
        done["write_completed"] += 1


_STD_STREAMS = {"/dev/stdout": 1, "/dev/stderr": 2}
#: Writers by path: loggers naming the same file share one writer (and its
#: settings: the first logger's flush_interval and max_buffer_bytes).
_writers: dict[str, _Writer] = {}


class FileAccessLog:
    """One ``access_log:`` entry naming ``file``."""

    def __init__(self, config: dict[str, Any], ctx: BuildContext) -> None:
        self.path: str = config["path"]
        if "format" in config and "json_format" in config:
            raise ValueError("file access log: give format or json_format, not both")
        self.format: DeferredFormat
        if "json_format" in config:
            self.format = compile_deferred_json_format(config["json_format"])
        else:
            text = config.get("format")
            if text is not None and not text.endswith("\n"):
                text += "\n"
            self.format = compile_deferred_format(text)
        self.flush_interval = parse_duration(config.get("flush_interval", "1s"))
        self.max_buffer_bytes = int(config.get("max_buffer_bytes", 8 * 1024 * 1024))
        self.stats = FileAccessLogStats(ctx.stats.scope("access_logs.file"))
        # Only objects: the file is opened, and the writer thread started, on
        # the first flush, so building (as `outrider validate` does) touches
        # nothing on disk.
        writer = _writers.get(self.path)
        if writer is None:
            writer = _writers[self.path] = _Writer(self.path, self.stats, self.flush_interval, self.max_buffer_bytes)
        self._writer: _Writer | None = writer
        self.log = self._make_log(writer)

    def _make_log(self, writer: _Writer) -> Callable[[Any], None]:
        # Closures over what they need: per stream, a capture and an append.
        capture, render = self.format
        captured: list[tuple[Any, ...]] = []
        hold = captured.append
        pending = writer.pending
        schedule = writer.schedule
        render_at = writer.render_at

        def render_held() -> None:
            if captured:
                render(captured, pending.append)
                captured.clear()

        def log(info: Any) -> None:
            hold(capture(info))
            n = len(captured)
            if n >= render_at[0]:
                render_held()
                if len(pending) >= FLUSH_LINES:
                    writer.flush()
            if n == 1:
                schedule()

        writer.attach(render_held)
        self._render_held = render_held
        return log

    def reopen(self) -> None:
        if self._writer is not None:
            self._writer.reopen()

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._render_held()
        writer.detach(self._render_held)
        if not writer.renderers:
            writer.close()
            if _writers.get(self.path) is writer:
                del _writers[self.path]
        else:
            writer.flush()


def create(config: dict[str, Any], ctx: BuildContext) -> FileAccessLog:
    return FileAccessLog(config, ctx)


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="file",
            category="access_loggers",
            factory=create,
            status="alpha",
            security_posture="robust_to_untrusted_downstream",
            description="Access log lines (Envoy command operators, or JSON) to a file, /dev/stdout or /dev/stderr; never blocks the proxy.",
        )
    )
