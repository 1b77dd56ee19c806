"""random: a uniformly random healthy host, weighted by ``Host.weight`` when
the weights differ. No state is shared between picks, so it needs no
coordination between workers and has no start-up bias.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

from outrider.hookspecs import hookimpl
from outrider.lb_support import WeightedHosts, panic_threshold, select_hosts
from outrider.registry import Extension
from outrider.upstream import Host


class RandomLoadBalancer:
    """Weighted random choice (see the module docstring)."""

    def __init__(
        self, config: Mapping[str, Any], hosts: Sequence[Host], rng: random.Random | None = None
    ) -> None:
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
        """A random eligible host; ``None`` when there is none."""
        return self._pool.pick(self.rng)


def create(
    config: Mapping[str, Any], ctx_or_hosts: Any = None, hosts: Sequence[Host] | None = None
) -> RandomLoadBalancer:
    """The factory: one balancer per cluster.

    The core calls ``create(config, build_context, hosts=hosts)``;
    ``create(config, hosts)`` works too.
    """
    if hosts is None:
        hosts = ctx_or_hosts or ()
    return RandomLoadBalancer(config, hosts)


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="random",
            category="load_balancers",
            factory=create,
            status="stable",
            security_posture="robust_to_untrusted_downstream",
            description="A random healthy host, weighted by host weight.",
        )
    )
