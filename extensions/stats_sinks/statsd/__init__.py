"""statsd: every stat sent over UDP to a statsd (or DogStatsD) collector,
batched once per flush interval into datagrams below a safe size.

Counters go as their increase since the previous flush (``|c``), gauges as
their value (``|g``), histograms as timers (``|ms``): one line per bucket
that received values in the interval, with a sample rate (``|@0.25``) that
says how many values it stands for. With ``tags`` or ``tag_extraction`` the
lines carry DogStatsD tags (``|#cluster:api,env:prod``).

A collector that is down or refuses the datagrams costs
``stats_sinks.statsd.send_failed`` and a rate-limited log line; sending
never waits, so requests are never slowed.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Iterable, Iterator, Mapping

from outrider import BuildContext, Extension, StatsGroup, hookimpl
from outrider.config.units import parse_address, parse_duration
from outrider.sinks import RateLimitedLog
from outrider.stats import Snapshot, StatsStore

#: Datagrams stay at or below this many bytes unless configured otherwise:
#: 1500 (Ethernet MTU) less IP and UDP headers, with room for IP options.
DEFAULT_MAX_PACKET = 1432

# Characters with a meaning in the statsd line protocol.
_NAME_UNSAFE = re.compile(r"[:|@#,\s]")
_TAG_UNSAFE = re.compile(r"[|@#,\s]")


class StatsdStats(StatsGroup):
    """``stats_sinks.statsd.*``"""

    COUNTERS = ("flushed", "packets_sent", "send_failed")


class _Protocol(asyncio.DatagramProtocol):
    transport: Any = None

    def __init__(self, sink: "StatsdSink") -> None:
        self.sink = sink

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def error_received(self, exc: Exception) -> None:
        # On a connected UDP socket the ICMP "port unreachable" of a
        # collector that is not there comes back here.
        self.sink._failed(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sink._transport is self.transport:  # the next flush reconnects
            self.sink._transport = None


class StatsdSink:
    """Formats snapshots as statsd lines and sends them in datagrams."""

    def __init__(self, config: Mapping[str, Any], ctx: BuildContext) -> None:
        self.address: str = config["address"]
        self.host, self.port = parse_address(self.address)
        self.host = self.host.strip("[]")
        self.flush_interval = parse_duration(config.get("flush_interval", "5s"))
        if self.flush_interval <= 0:
            raise ValueError("statsd: flush_interval must be more than 0s")
        prefix = config.get("prefix", "outrider")
        self.prefix = f"{prefix}." if prefix else ""
        self.tag_extraction = bool(config.get("tag_extraction", False))
        self.static_tags = tuple(
            f"{_TAG_UNSAFE.sub('_', k)}:{_TAG_UNSAFE.sub('_', str(v))}" if v != "" else _TAG_UNSAFE.sub("_", k)
            for k, v in (config.get("tags") or {}).items()
        )
        self.max_packet = int(config.get("max_packet_size", DEFAULT_MAX_PACKET))
        self.stats = StatsdStats(ctx.stats.scope("stats_sinks.statsd"))
        self.log = ctx.logger
        self._log_failure = RateLimitedLog(ctx.logger)
        self._transport: asyncio.DatagramTransport | None = None
        self._connecting: asyncio.Task | None = None
        self._gauges_sent: set[str] = set()
        #: Counter deltas of flushes that had no socket, sent with the next one.
        self._unsent: dict[str, int] = {}
        self._names: dict[str, str] = {}

    # -- the sink contract ------------------------------------------------------

    def start(self, store: StatsStore) -> None:
        self._connect()

    def flush(self, snapshot: Snapshot) -> None:
        transport = self._transport
        if transport is None:
            # Not connected (yet, or any more: the address did not resolve).
            self._failed(OSError(f"no socket to {self.address} yet"))
            self._connect()
            unsent = self._unsent
            for c in snapshot.counters:
                if c.delta:
                    unsent[c.name] = unsent.get(c.name, 0) + c.delta
            return
        packets = 0
        for packet in self.packets(self.lines(snapshot)):
            transport.sendto(packet)
            packets += 1
        self.stats.packets_sent.value += packets
        self.stats.flushed.value += 1

    def stop(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- the socket -------------------------------------------------------------

    def _connect(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            return
        self._connecting = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), remote_addr=(self.host, self.port)
            )
        except OSError as exc:  # the name did not resolve, no route...
            self._failed(exc)
            return
        self._transport = transport  # type: ignore[assignment]

    def _failed(self, exc: BaseException) -> None:
        self.stats.send_failed.value += 1
        self._log_failure(logging.WARNING, "statsd: sending stats to %s failed: %s", self.address, exc)

    # -- the line protocol ------------------------------------------------------

    def _name(self, name: str) -> str:
        safe = self._names.get(name)
        if safe is None:
            safe = self._names[name] = self.prefix + _NAME_UNSAFE.sub("_", name)
        return safe

    def _tags(self, tags: Iterable[tuple[str, str]]) -> str:
        items = [f"{k}:{_TAG_UNSAFE.sub('_', v)}" for k, v in tags] if self.tag_extraction else []
        items += self.static_tags
        return f"|#{','.join(items)}" if items else ""

    def _split(self, sample: Any) -> tuple[str, str]:
        if self.tag_extraction:
            return self._name(sample.tag_name), self._tags(sample.tags)
        return self._name(sample.name), self._tags(())

    def lines(self, snapshot: Snapshot) -> Iterator[str]:
        """The statsd lines of one flush."""
        unsent = self._unsent
        for c in snapshot.counters:
            delta = c.delta + unsent.pop(c.name, 0) if unsent else c.delta
            if delta:
                name, tags = self._split(c)
                yield f"{name}:{delta}|c{tags}"
        sent = self._gauges_sent
        for g in snapshot.gauges:
            # Gauges that are and always were 0 are left out; one that
            # dropped back to 0 is sent, so the collector sees it.
            if not g.value and g.name not in sent:
                continue
            sent.add(g.name)
            name, tags = self._split(g)
            if g.value < 0:  # a signed gauge value is a change, not a value
                yield f"{name}:0|g{tags}"
            yield f"{name}:{g.value}|g{tags}"
        for h in snapshot.histograms:
            if not h.interval.count:
                continue
            name, tags = self._split(h)
            for value, count in h.interval.nonzero():
                rate = f"|@{1 / count:.6g}" if count > 1 else ""
                yield f"{name}:{_ms(value)}|ms{rate}{tags}"

    def packets(self, lines: Iterable[str]) -> Iterator[bytes]:
        """``lines`` joined by newlines into datagrams of at most
        ``max_packet_size`` bytes (a longer line goes alone)."""
        batch: list[bytes] = []
        size = 0
        for line in lines:
            data = line.encode("utf-8")
            if batch and size + 1 + len(data) > self.max_packet:
                yield b"\n".join(batch)
                batch, size = [], 0
            size += len(data) + (1 if batch else 0)
            batch.append(data)
        if batch:
            yield b"\n".join(batch)


def _ms(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def create(config: Mapping[str, Any], ctx: BuildContext) -> StatsdSink:
    return StatsdSink(config, ctx)


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="statsd",
            category="stats_sinks",
            factory=create,
            status="alpha",
            security_posture="robust_to_untrusted_downstream",
            description="Sends stats over UDP to a statsd or DogStatsD collector, batched per flush interval.",
        )
    )
