"""Building blocks for ``load_balancers`` extensions.

Every load balancer needs the same two things, with Envoy's semantics, so they
live here in the core rather than being copied (or cross-imported) between
extensions:

* **Which hosts to balance over** — the healthy ones, unless fewer than
  ``healthy_panic_threshold`` percent of the hosts are healthy: then the
  cluster is "in panic" and *all* hosts are used, because sending traffic to
  possibly-unhealthy hosts beats overloading the few healthy ones (or failing
  everything when health checking itself is broken). See
  :func:`panic_threshold` and :func:`select_hosts`.
* **Weighted random picks** — one host, or several distinct ones, with
  probability proportional to ``Host.weight``. See :class:`WeightedHosts`.

Both are meant to run in ``hosts_changed`` (precompute) and ``choose`` (cheap
picks) respectively::

    from outrider.lb_support import WeightedHosts, panic_threshold, select_hosts

    class MyBalancer:
        def __init__(self, config, hosts):
            self.threshold = panic_threshold(config)
            self.hosts_changed(hosts)

        def hosts_changed(self, hosts):
            eligible, self.panic = select_hosts(hosts, self.threshold)
            self.pool = WeightedHosts(eligible)

        def choose(self, context=None):
            return self.pool.pick(self.rng)
"""

from __future__ import annotations

import random
from bisect import bisect_right, insort
from itertools import accumulate
from typing import Any, Mapping, Sequence

from .upstream import Host

__all__ = [
    "DEFAULT_HEALTHY_PANIC_THRESHOLD",
    "WeightedHosts",
    "host_weight",
    "in_panic",
    "panic_threshold",
    "select_hosts",
]

#: Envoy's default ``healthy_panic_threshold``, in percent.
DEFAULT_HEALTHY_PANIC_THRESHOLD = 50.0


def panic_threshold(config: Mapping[str, Any]) -> float:
    """The ``healthy_panic_threshold`` of a balancer's config, in percent
    (default 50; 0 disables panic mode)."""
    value = float(config.get("healthy_panic_threshold", DEFAULT_HEALTHY_PANIC_THRESHOLD))
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"healthy_panic_threshold must be between 0 and 100, got {value}")
    return value


def in_panic(total: int, healthy: int, threshold: float) -> bool:
    """Whether a host set of ``total`` hosts, ``healthy`` of them healthy, is in
    panic: fewer than ``threshold`` percent healthy (by host count, as Envoy
    counts it). An empty set counts as 0 % healthy."""
    healthy_percent = 100.0 * healthy / total if total else 0.0
    return healthy_percent < threshold


def select_hosts(hosts: Sequence[Host], threshold: float) -> tuple[list[Host], bool]:
    """The hosts to balance over, and whether that is because of panic.

    Returns ``(healthy hosts, False)`` normally and ``(all hosts, True)`` in
    panic. The list is empty when there is nothing to choose from (no hosts,
    or no healthy host with panic disabled): ``choose`` then returns ``None``.
    """
    healthy = [h for h in hosts if h.healthy]
    if in_panic(len(hosts), len(healthy), threshold):
        return list(hosts), True
    return healthy, False


def host_weight(host: Host) -> int:
    """A host's load-balancing weight, at least 1 (Envoy rejects weight 0; a
    host that is in the set is always eligible)."""
    return max(int(host.weight), 1)


class WeightedHosts:
    """A fixed list of hosts prepared for weighted random picks.

    Build it in ``hosts_changed``; :meth:`pick` is O(1) when all weights are
    equal and O(log n) otherwise, :meth:`pick_distinct` O(k·log n + k²).
    """

    __slots__ = ("hosts", "weights", "uniform", "total", "_cumulative")

    def __init__(self, hosts: Sequence[Host]) -> None:
        self.hosts: tuple[Host, ...] = tuple(hosts)
        self.weights: tuple[int, ...] = tuple(host_weight(h) for h in self.hosts)
        #: True when every host has the same weight: picks are plain indexes.
        self.uniform: bool = len(set(self.weights)) <= 1
        self.total: int = sum(self.weights)
        # cumulative[i] is the end of host i's interval on [0, total).
        self._cumulative: tuple[int, ...] = tuple(accumulate(self.weights))

    def __len__(self) -> int:
        return len(self.hosts)

    def pick(self, rng: random.Random) -> Host | None:
        """One host, with probability weight / total; ``None`` if empty."""
        hosts = self.hosts
        if not hosts:
            return None
        if self.uniform:
            return hosts[rng.randrange(len(hosts))]
        return hosts[bisect_right(self._cumulative, rng.random() * self.total)]

    def pick_distinct(self, rng: random.Random, k: int) -> list[Host]:
        """``min(k, len(self))`` distinct hosts in the order drawn, each drawn
        with probability proportional to its weight among those not yet drawn
        (weighted sampling without replacement). The order matters to callers
        that break ties by "first drawn wins", as Envoy's least_request does."""
        n = len(self.hosts)
        # With k >= n every host is returned, but still in random order: a
        # fixed order would make "first drawn wins" always favour hosts[0].
        k = min(k, n)
        if self.uniform:
            return [self.hosts[i] for i in self._distinct_indexes(rng, k, n)]
        return [self.hosts[i] for i in self._distinct_weighted_indexes(rng, k)]

    @staticmethod
    def _distinct_indexes(rng: random.Random, k: int, n: int) -> list[int]:
        # Draw from the n - len(taken) remaining slots and shift the draw past
        # every taken index at or below it: no rejection loop, no O(n) copy.
        taken: list[int] = []  # ascending, for the shifting
        drawn: list[int] = []  # draw order, for the caller
        for remaining in range(n, n - k, -1):
            index = rng.randrange(remaining)
            for t in taken:
                if index >= t:
                    index += 1
            insort(taken, index)
            drawn.append(index)
        return drawn

    def _distinct_weighted_indexes(self, rng: random.Random, k: int) -> list[int]:
        # Same idea on the weight line: draw a point on the total weight minus
        # the taken hosts' weights, then stretch it over the taken intervals.
        cumulative, weights = self._cumulative, self.weights
        taken: list[int] = []  # ascending, for the shifting
        drawn: list[int] = []  # draw order, for the caller
        left = self.total
        for _ in range(k):
            point = rng.random() * left
            for t in taken:  # ascending, so each shift is against the real line
                if point >= cumulative[t] - weights[t]:
                    point += weights[t]
            index = bisect_right(cumulative, point)
            if index >= len(cumulative):  # float rounding at the very end
                index = len(cumulative) - 1
            while index in taken:  # rounding landed on a taken boundary
                index = (index + 1) % len(cumulative)
            insort(taken, index)
            drawn.append(index)
            left -= weights[index]
        return drawn
