"""round_robin: weighted round robin over the healthy hosts of a cluster.

Equal weights give a strict rotation. Unequal weights use earliest-deadline-
first scheduling, as Envoy does: host *i* is due every ``1 / weight_i``, and
the host with the earliest deadline goes next. Picks come out in exact
proportion to the weights and interleaved (weights 1:2 give ``b a b b a b``,
never ``a b b a b b`` clumps of more than a host's weight).

The whole schedule is computed once in ``hosts_changed`` so that ``choose`` is
an index increment; only pathological weights (a period longer than
``MAX_SCHEDULE``) fall back to stepping the EDF heap per pick, O(log n).
"""

from __future__ import annotations

import heapq
from functools import reduce
from math import gcd, lcm
from typing import Any, Mapping, Sequence

from outrider.hookspecs import hookimpl
from outrider.lb_support import host_weight, panic_threshold, select_hosts
from outrider.registry import Extension
from outrider.upstream import Host

#: Longest precomputed schedule (entries); longer periods are stepped live.
MAX_SCHEDULE = 16384


class _EdfScheduler:
    """Earliest-deadline-first over fixed weights, with exact integer deadlines.

    Deadlines are multiples of ``L / weight`` with ``L`` the lcm of the
    weights, so ties (which are common: every period ends with one) are
    resolved deterministically by host index instead of by float rounding.
    """

    __slots__ = ("_heap", "_hosts", "_steps")

    def __init__(self, hosts: Sequence[Host], weights: Sequence[int]) -> None:
        period_length = reduce(lcm, weights, 1)
        self._hosts = tuple(hosts)
        self._steps = tuple(period_length // w for w in weights)
        self._heap = [(step, i) for i, step in enumerate(self._steps)]
        heapq.heapify(self._heap)

    def next(self) -> Host:
        deadline, i = self._heap[0]
        heapq.heapreplace(self._heap, (deadline + self._steps[i], i))
        return self._hosts[i]


class RoundRobinLoadBalancer:
    """Weighted round robin (see the module docstring)."""

    def __init__(self, config: Mapping[str, Any], hosts: Sequence[Host]) -> None:
        self.panic_threshold = panic_threshold(config)
        #: True while fewer than ``healthy_panic_threshold`` % of hosts are
        #: healthy and all hosts are being used.
        self.panic = False
        self._index = 0
        self._schedule: tuple[Host, ...] = ()
        self._live: _EdfScheduler | None = None
        self.hosts_changed(hosts)

    def hosts_changed(self, hosts: Sequence[Host]) -> None:
        """Recompute the eligible hosts and the schedule over them."""
        eligible, self.panic = select_hosts(hosts, self.panic_threshold)
        weights = [host_weight(h) for h in eligible]
        self._live = None
        if len(set(weights)) <= 1:
            self._schedule = tuple(eligible)  # strict rotation
        else:
            divisor = reduce(gcd, weights)
            weights = [w // divisor for w in weights]  # 2:4 is the same as 1:2
            edf = _EdfScheduler(eligible, weights)
            period = sum(weights)
            if period <= MAX_SCHEDULE:
                # One period of EDF contains each host exactly `weight` times
                # and then repeats, so it can be cached and cycled.
                self._schedule = tuple(edf.next() for _ in range(period))
            else:
                self._schedule = ()
                self._live = edf
        # Keep the position (rather than restarting at 0) so that frequent
        # health flips do not keep sending the next request to the first host.
        self._index = self._index % len(self._schedule) if self._schedule else 0

    def choose(self, context: Any = None) -> Host | None:
        """The next host in the schedule; ``None`` when there is none."""
        schedule = self._schedule
        if schedule:
            index = self._index
            self._index = index + 1 if index + 1 < len(schedule) else 0
            return schedule[index]
        if self._live is not None:
            return self._live.next()
        return None


def create(
    config: Mapping[str, Any], ctx_or_hosts: Any = None, hosts: Sequence[Host] | None = None
) -> RoundRobinLoadBalancer:
    """The factory: one balancer per cluster.

    The core calls ``create(config, build_context, hosts=hosts)``;
    ``create(config, hosts)`` works too.
    """
    if hosts is None:
        hosts = ctx_or_hosts or ()
    return RoundRobinLoadBalancer(config, hosts)


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="round_robin",
            category="load_balancers",
            factory=create,
            status="stable",
            security_posture="robust_to_untrusted_downstream",
            description="Weighted round robin (smooth, earliest-deadline-first) over the healthy hosts.",
        )
    )
