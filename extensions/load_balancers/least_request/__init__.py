"""least_request: the power of ``choice_count`` choices over the healthy hosts.

Each pick draws ``choice_count`` (default 2) *distinct* hosts at random —
weighted by ``Host.weight`` when the weights differ — and returns the one with
the fewest requests in flight (``Host.active_requests``, kept by the core).
Ties go to the host drawn first, so idle clusters still spread evenly.

Because the draws are distinct, the single busiest host is never chosen while
any other eligible host has fewer requests in flight.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

from outrider.hookspecs import hookimpl
from outrider.lb_support import WeightedHosts, panic_threshold, select_hosts
from outrider.registry import Extension
from outrider.upstream import Host

DEFAULT_CHOICE_COUNT = 2


class LeastRequestLoadBalancer:
    """Power of N choices by ``active_requests`` (see the module docstring)."""

    def __init__(
        self, config: Mapping[str, Any], hosts: Sequence[Host], rng: random.Random | None = None
    ) -> None:
        self.choice_count = int(config.get("choice_count", DEFAULT_CHOICE_COUNT))
        if self.choice_count < 2:
            raise ValueError(f"choice_count must be at least 2, got {self.choice_count}")
        self.panic_threshold = panic_threshold(config)
        #: Injected in tests for reproducible picks; its own instance otherwise
        #: so no other user of the ``random`` module shifts this sequence.
        self.rng = rng or random.Random()
        #: True while fewer than ``healthy_panic_threshold`` % of hosts are
        #: healthy and all hosts are being used.
        self.panic = False
        self._pool = WeightedHosts(())
        self.hosts_changed(hosts)

    def hosts_changed(self, hosts: Sequence[Host]) -> None:
        """Recompute the eligible hosts and their weights."""
        eligible, self.panic = select_hosts(hosts, self.panic_threshold)
        self._pool = WeightedHosts(eligible)

    def choose(self, context: Any = None) -> Host | None:
        """The least busy of ``choice_count`` random hosts; ``None`` if none."""
        pool = self._pool
        if len(pool) <= 1:
            return pool.hosts[0] if pool.hosts else None
        best: Host | None = None
        for host in pool.pick_distinct(self.rng, self.choice_count):
            # Strictly fewer: on a tie the first drawn (a random one) stays.
            if best is None or host.active_requests < best.active_requests:
                best = host
        return best


def create(
    config: Mapping[str, Any], ctx_or_hosts: Any = None, hosts: Sequence[Host] | None = None
) -> LeastRequestLoadBalancer:
    """The factory: one balancer per cluster.

    The core calls ``create(config, build_context, hosts=hosts)``;
    ``create(config, hosts)`` works too.
    """
    if hosts is None:
        hosts = ctx_or_hosts or ()
    return LeastRequestLoadBalancer(config, hosts)


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="least_request",
            category="load_balancers",
            factory=create,
            status="stable",
            security_posture="robust_to_untrusted_downstream",
            description="Power of two (or N) random choices: the host with the fewest active requests.",
        )
    )
