"""Writes held until the loop has handled the events at hand (write_batch.py),
over real loopback sockets, on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Callable

import pytest

from outrider.write_batch import BatchedWriter, write_batch

LOOPS: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
try:
    import uvloop
except ImportError:  # pragma: no cover
    pass
else:
    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))


class CountingTransport:
    """The real transport, with its write calls counted."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self.calls: list[tuple[str, int]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", 1))
        self._transport.write(data)

    def writelines(self, lines: Any) -> None:
        lines = list(lines)
        self.calls.append(("writelines", len(lines)))
        self._transport.writelines(lines)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class Writer(BatchedWriter, asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.init_batched_writes(loop)
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = CountingTransport(transport)  # type: ignore[arg-type]


async def connected_pair() -> tuple[Writer, socket.socket]:
    """A protocol on a real loopback connection and the raw peer socket."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        writer = Writer(loop)
        await loop.create_connection(lambda: writer, *listener.getsockname())
        peer, _ = listener.accept()
    finally:
        listener.close()
    peer.setblocking(False)
    return writer, peer


def received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def read_until(peer: socket.socket, size: int) -> bytes:
    data = b""
    for _ in range(200):  # bounded: 2 s at most
        data += received(peer)
        if len(data) >= size:
            break
        await asyncio.sleep(0.01)
    return data


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> Any:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_writes_leave_after_the_current_callback_in_one_call_per_protocol(loop_factory):
    async def scenario() -> None:
        (first, first_peer), (second, second_peer) = await connected_pair(), await connected_pair()
        loop = asyncio.get_running_loop()
        seen_inside: list[bytes] = []

        def one_batch_of_events() -> None:
            first.batched_write(b"HTTP/1.1 200 OK\r\n\r\n")
            second.batched_write(b"GET / HTTP/1.1\r\n\r\n")
            first.batched_write(b"body")
            # Nothing is on the wire while the loop is still handling events.
            seen_inside.extend((received(first_peer), received(second_peer)))

        loop.call_soon(one_batch_of_events)
        await asyncio.sleep(0)
        assert seen_inside == [b"", b""]
        assert await read_until(first_peer, 23) == b"HTTP/1.1 200 OK\r\n\r\nbody"
        assert await read_until(second_peer, 18) == b"GET / HTTP/1.1\r\n\r\n"
        assert first.transport.calls == [("writelines", 2)]
        assert second.transport.calls == [("write", 1)]
        # The next batch starts afresh.
        first.batched_write(b"more")
        assert await read_until(first_peer, 4) == b"more"
        assert first.transport.calls == [("writelines", 2), ("write", 1)]
        for peer in (first_peer, second_peer):
            peer.close()

    run(loop_factory, scenario())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_flush_before_close_sends_what_is_held_and_abort_drops_it(loop_factory):
    async def scenario() -> None:
        closing, closing_peer = await connected_pair()
        aborting, aborting_peer = await connected_pair()
        closing.batched_write(b"last words")
        closing.close_after_writes()
        aborting.batched_write(b"never sent")
        aborting.transport.abort()
        await asyncio.sleep(0.05)
        assert await read_until(closing_peer, 10) == b"last words"
        try:
            leftover = aborting_peer.recv(100)
        except (BlockingIOError, ConnectionResetError):
            leftover = b""
        assert leftover == b""
        assert aborting.transport.calls == []  # the batch found it closing
        for peer in (closing_peer, aborting_peer):
            peer.close()

    run(loop_factory, scenario())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_writer_that_fails_to_flush_costs_a_log_line_not_the_others_bytes(loop_factory, caplog):
    class Broken(Writer):
        def flush_writes(self) -> None:
            raise RuntimeError("broken transport")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broken = Broken(loop)
        good, peer = await connected_pair()
        broken.batched_write(b"x")
        good.batched_write(b"still sent")
        assert await read_until(peer, 10) == b"still sent"
        peer.close()

    with caplog.at_level(logging.ERROR, logger="outrider.write_batch"):
        run(loop_factory, scenario())
    assert "broken transport" in caplog.text


def test_each_loop_has_its_own_batch():
    one, two = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert write_batch(one) is write_batch(one)
        assert write_batch(one) is not write_batch(two)
    finally:
        one.close()
        two.close()
