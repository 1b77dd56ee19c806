"""What an extension factory receives besides its own config."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .cluster import ClusterManager
    from .registry import Extension, Registry
    from .stats import StatsStore
    from .tracing import HttpTracing


class BuildContext:
    """Handed to every extension factory at config time.

    ``stats`` to create the extension's counters (under its own stat prefix),
    ``cluster_manager`` to find upstream clusters, ``logger`` named after the
    extension, ``registry`` to look up other extensions (e.g. a codec),
    ``tracing`` (an :class:`outrider.tracing.HttpTracing`, or ``None`` when
    the config has no ``tracing:``) for what talks to upstreams.
    """

    def __init__(
        self,
        registry: "Registry",
        stats: "StatsStore",
        cluster_manager: "ClusterManager | None" = None,
        server: Any = None,
        extension: "Extension | None" = None,
        tracing: "HttpTracing | None" = None,
    ) -> None:
        self.registry = registry
        self.stats = stats
        self.cluster_manager = cluster_manager
        self.server = server
        self.extension = extension
        self.tracing = tracing
        name = extension.name if extension else "core"
        self.logger = logging.getLogger(f"outrider.ext.{name}")

    def for_extension(self, extension: "Extension") -> "BuildContext":
        return BuildContext(self.registry, self.stats, self.cluster_manager, self.server, extension, self.tracing)

    def with_tracing(self, tracing: "HttpTracing | None") -> "BuildContext":
        """This context with ``tracing`` (a listener's, say) in place of its own."""
        return BuildContext(self.registry, self.stats, self.cluster_manager, self.server, self.extension, tracing)

    def build(self, category: str, ref: dict[str, Any], **kwargs: Any) -> Any:
        """Instantiate the extension named by ``ref`` (``{name, config}``):
        calls its factory with its config and a context of its own."""
        ext = self.registry.get(category, ref["name"])
        if ext is None:
            raise LookupError(f"no {category} extension named {ref['name']!r} is installed")
        return ext.factory(ref.get("config") or {}, self.for_extension(ext), **kwargs)
