"""Socket writes held until the event loop has handled every ready event.

A proxy under load gets a batch of ready sockets from each poll. Writing as
each request is handled spreads the writes over the whole batch, so a peer
that keeps up (the upstream, the client) goes back to sleep between two of
them and every write pays for waking it (in a VM, an inter-processor
interrupt). Holding the writes until the batch is done sends them back to
back, and a peer wakes once per batch: on the team's VM that halved the
proxy's system time per request (bench/RESULTS.md). That is what Envoy does too:
its connections write when the dispatcher gets round to their write event,
after the events at hand.

A protocol mixes in :class:`BatchedWriter`, calls :meth:`~BatchedWriter.
init_batched_writes` once, and writes with :meth:`~BatchedWriter.
batched_write`. What one protocol writes in a batch goes out in one
``writelines`` (one ``writev`` with uvloop). The writes go out from a
``call_soon`` callback, so they follow everything the loop is handling now
and come before it polls again, without waiting. Before closing the
transport, call :meth:`~BatchedWriter.flush_writes`, so that what is held is
not lost (:meth:`~BatchedWriter.close_after_writes` and
:meth:`~BatchedWriter.write_eof_after_writes` do both); an aborted transport
drops it, as abort drops the transport's own buffer.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

log = logging.getLogger("outrider.write_batch")


class WriteBatch:
    """The protocols holding writes on one event loop (see :func:`write_batch`)."""

    __slots__ = ("_loop", "_writers", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._writers: list[BatchedWriter] = []

    def add(self, writer: "BatchedWriter") -> None:
        """``writer`` holds its first write of this batch."""
        writers = self._writers
        if not writers:
            self._loop.call_soon(self._flush)
        writers.append(writer)

    def _flush(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            try:
                writer.flush_writes()
            except Exception:  # one broken transport must not keep the others' bytes
                log.exception("flushing the writes of %r failed", writer)


_BATCHES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteBatch]" = weakref.WeakKeyDictionary()


def write_batch(loop: asyncio.AbstractEventLoop) -> WriteBatch:
    """The :class:`WriteBatch` of ``loop`` (one per loop, made on first use)."""
    batch = _BATCHES.get(loop)
    if batch is None:
        batch = _BATCHES[loop] = WriteBatch(loop)
    return batch


class BatchedWriter:
    """Mixin for an ``asyncio.Protocol`` whose writes wait for the batch end."""

    transport: asyncio.WriteTransport | None
    _held: list[bytes] | None = None
    _write_batch: WriteBatch

    def init_batched_writes(self, loop: asyncio.AbstractEventLoop) -> None:
        self._write_batch = write_batch(loop)

    def batched_write(self, data: bytes) -> None:
        """Send ``data`` once the loop has handled the events at hand."""
        held = self._held
        if held is None:
            self._held = [data]
            self._write_batch.add(self)
        else:
            held.append(data)

    def flush_writes(self) -> None:
        """Hand what is held to the transport now (before closing it, say)."""
        held = self._held
        if held is None:
            return
        self._held = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # aborted or lost: the bytes have nowhere to go
        if len(held) == 1:
            transport.write(held[0])
        else:
            transport.writelines(held)

    def close_after_writes(self) -> None:
        """Close the transport once what is held went out (it then sends
        what it buffers, and the FIN)."""
        self.flush_writes()
        self.transport.close()  # type: ignore[union-attr]

    def write_eof_after_writes(self) -> None:
        """Half-close once what is held went out."""
        self.flush_writes()
        self.transport.write_eof()  # type: ignore[union-attr]
