"""The statsd sink keeps counter deltas it could not send for want of a
socket and sends them with the next flush that has one (a real UDP
receiver on loopback)."""

from __future__ import annotations

import asyncio
import socket

from outrider.context import BuildContext
from outrider.extensions.stats_sinks.statsd import StatsdSink
from outrider.registry import Registry
from outrider.stats import SnapshotTaker, StatsStore


def test_counter_deltas_from_flushes_without_a_socket_are_sent_later():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    store = StatsStore()
    requests = store.counter("http.web.downstream_rq_total")
    sink = StatsdSink(
        {"address": f"127.0.0.1:{receiver.getsockname()[1]}", "prefix": ""}, BuildContext(Registry(), store)
    )
    taker = SnapshotTaker(store)

    async def scenario() -> None:
        requests.inc(3)
        sink.flush(taker.take())  # not started: no socket yet; it starts connecting
        requests.inc(4)
        sink.flush(taker.take())  # maybe still none
        for _ in range(100):  # bounded: 1 s
            if sink._transport is not None:
                break
            await asyncio.sleep(0.01)
        requests.inc(5)
        sink.flush(taker.take())
        sink.stop()

    try:
        asyncio.run(scenario())
        lines = receiver.recv(65536).decode().split("\n")
    finally:
        receiver.close()
    assert "http.web.downstream_rq_total:12|c" in lines
    assert store.counter("stats_sinks.statsd.send_failed").value >= 1
