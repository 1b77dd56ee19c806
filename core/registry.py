"""The extension registry: what is installed, under which name, from where.

Every extension — built-in or third-party — arrives through the ``outrider``
entry-point group and calls ``registry.add`` from its ``outrider_register`` hook.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs

#: The extension categories, named after the folders of ``extensions/``.
CATEGORIES = (
    "codecs",
    "filters.network",
    "filters.http",
    "tracers",
    "stats_sinks",
    "access_loggers",
    "load_balancers",
    "health_checkers",
)
STATUSES = ("stable", "alpha", "wip")
SECURITY_POSTURES = (
    "robust_to_untrusted_downstream",
    "requires_trusted_downstream_and_upstream",
    "unknown",
)


class RegistryError(Exception):
    """An extension could not be registered (bad metadata or a name clash)."""


@dataclass(frozen=True)
class Extension:
    """What an extension declares about itself.

    ``factory`` is called once per configured use, at config time, with the
    validated ``config`` mapping and a :class:`outrider.BuildContext`; what it
    returns depends on the category (see CONTRIBUTING.md).
    """

    name: str
    category: str
    factory: Callable[..., Any]
    description: str = ""
    schema: dict[str, Any] | None = None
    status: str = "stable"
    security_posture: str = "unknown"
    #: For extensions that run a whole listener protocol (``tcp:``, ``kafka:``):
    #: the listener key that selects them. ``http`` is the core's own.
    listener_protocol: str | None = None
    #: For ``filters.http``: the schema of a route's ``per_filter_config``
    #: entry for this filter (``per_route_schema.json``); ``schema`` when absent.
    per_route_schema: dict[str, Any] | None = None
    readme_path: str | None = None
    distribution: str = "unknown"
    version: str = ""
    module: str = ""

    @classmethod
    def from_module(cls, module_name: str, **fields: Any) -> "Extension":
        """Build an Extension whose ``schema.json`` and ``README.md`` sit beside
        the module ``module_name`` (the usual one-folder-per-extension layout)."""
        import sys

        folder = os.path.dirname(os.path.abspath(sys.modules[module_name].__file__ or ""))
        schema_path = os.path.join(folder, "schema.json")
        if "schema" not in fields and os.path.exists(schema_path):
            with open(schema_path, encoding="utf-8") as f:
                fields["schema"] = json.load(f)
        per_route_path = os.path.join(folder, "per_route_schema.json")
        if "per_route_schema" not in fields and os.path.exists(per_route_path):
            with open(per_route_path, encoding="utf-8") as f:
                fields["per_route_schema"] = json.load(f)
        readme = os.path.join(folder, "README.md")
        if "readme_path" not in fields and os.path.exists(readme):
            fields["readme_path"] = readme
        fields.setdefault("module", module_name)
        return cls(**fields)

    @property
    def key(self) -> str:
        return f"{self.category}/{self.name}"

    def readme(self) -> str:
        if not self.readme_path:
            return ""
        with open(self.readme_path, encoding="utf-8") as f:
            return f.read()


@dataclass
class Registry:
    """All registered extensions, by category and name."""

    by_category: dict[str, dict[str, Extension]] = field(
        default_factory=lambda: {c: {} for c in CATEGORIES}
    )
    plugin_manager: pluggy.PluginManager | None = None
    _current_distribution: tuple[str, str] = ("unknown", "")

    def add(self, extension: Extension) -> None:
        """Register ``extension``; a second one of the same name and category is
        an error naming both distributions."""
        if extension.category not in CATEGORIES:
            raise RegistryError(
                f"extension {extension.name!r}: unknown category {extension.category!r}"
                f" (one of: {', '.join(CATEGORIES)})"
            )
        if extension.status not in STATUSES:
            raise RegistryError(f"extension {extension.name!r}: status must be one of {STATUSES}")
        if extension.security_posture not in SECURITY_POSTURES:
            raise RegistryError(
                f"extension {extension.name!r}: security_posture must be one of {SECURITY_POSTURES}"
            )
        dist, version = self._current_distribution
        if extension.distribution == "unknown":
            extension = replace(extension, distribution=dist, version=version)
        existing = self.by_category[extension.category].get(extension.name)
        if existing is not None:
            raise RegistryError(
                f"two extensions named {extension.name!r} in category {extension.category!r}: "
                f"one from distribution {existing.distribution!r} ({existing.module}), "
                f"one from {extension.distribution!r} ({extension.module}); "
                "uninstall one of them"
            )
        if extension.listener_protocol:
            other = self.listener_protocol(extension.listener_protocol)
            if other is not None:
                raise RegistryError(
                    f"two extensions serve the listener protocol {extension.listener_protocol!r}: "
                    f"{other.key} from {other.distribution!r} and {extension.key} "
                    f"from {extension.distribution!r}"
                )
        self.by_category[extension.category][extension.name] = extension

    def get(self, category: str, name: str) -> Extension | None:
        return self.by_category.get(category, {}).get(name)

    def names(self, category: str) -> list[str]:
        return sorted(self.by_category.get(category, {}))

    def closest(self, category: str, name: str) -> str | None:
        matches = difflib.get_close_matches(name, self.names(category), n=1, cutoff=0.5)
        return matches[0] if matches else None

    def listener_protocol(self, key: str) -> Extension | None:
        for extensions in self.by_category.values():
            for ext in extensions.values():
                if ext.listener_protocol == key:
                    return ext
        return None

    def listener_protocols(self) -> list[str]:
        return sorted(e.listener_protocol for e in self.all() if e.listener_protocol)

    def all(self) -> Iterable[Extension]:
        for category in CATEGORIES:
            yield from (self.by_category[category][n] for n in sorted(self.by_category[category]))

    def find(self, name: str) -> list[Extension]:
        """Every extension called ``name`` (or ``category/name``)."""
        if "/" in name:
            category, _, short = name.rpartition("/")
            ext = self.get(category, short)
            return [ext] if ext else []
        return [e for e in self.all() if e.name == name]


def load_registry(extra_plugins: Iterable[Any] = (), entry_points: bool = True) -> Registry:
    """Discover every installed extension and return the filled registry.

    ``extra_plugins`` are plugin objects (modules) registered in addition to
    the entry points, as an embedding application would. A plugin that fails
    to import is a startup error naming its entry point and distribution.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry = Registry(plugin_manager=pm)
    plugins: list[tuple[Any, tuple[str, str]]] = []
    if entry_points:
        seen: set[str] = set()
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
            dist = (ep.dist.metadata["name"], ep.dist.version) if ep.dist else ("unknown", "")
            key = f"{dist[0]}:{ep.name}"
            if key in seen:  # the same distribution seen twice on sys.path
                continue
            seen.add(key)
            try:
                plugin = ep.load()
            except Exception as exc:
                raise RegistryError(
                    f"extension entry point {ep.name!r} ({ep.value}) of distribution "
                    f"{dist[0]!r} failed to import: {exc!r}"
                ) from exc
            if pm.is_registered(plugin):
                continue
            pm.register(plugin, name=key)
            plugins.append((plugin, dist))
    for plugin in extra_plugins:
        pm.register(plugin)
        plugins.append((plugin, (getattr(plugin, "__name__", "unknown"), "")))
    # Each plugin's hook is called on its own so that every extension is
    # stamped with the distribution that registered it (for clash errors and
    # `outrider extensions list`).
    for plugin, dist in plugins:
        impl = getattr(plugin, "outrider_register", None)
        if impl is None:
            continue
        registry._current_distribution = dist
        impl(registry=registry)
    registry._current_distribution = ("unknown", "")
    return registry
