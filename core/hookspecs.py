"""The Outrider extension contract: every hook a plugin may implement.

Extensions are discovered through the ``outrider`` entry-point group and loaded
by pluggy. pluggy is used only for discovery, registration and lifecycle events;
the per-request path never calls a hook. At config time each chain is built once
into plain objects whose methods the data path calls directly. What each
category's factory is called with and must return is in CONTRIBUTING.md; the
stats sink contract (``start``/``flush``/``stop``) is in ``outrider.sinks``,
the access logger's (``log``/``reopen``/``close``) in ``outrider.access_log``,
and the tracer's in ``outrider.tracing``: ``factory(config, ctx)`` returns a
``Tracer`` subclass that extracts an incoming context from request headers
(``None`` when absent or malformed), formats a context as headers for the
upstream, and encodes finished spans for its collector; the core decides
sampling, keeps the spans and batches the export off the request path.

A minimal plugin module::

    from outrider import Extension, hookimpl

    @hookimpl
    def outrider_register(registry):
        registry.add(Extension.from_module(__name__, name="my_filter",
                     category="filters.http", factory=MyFilterFactory,
                     description="Adds a header."))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .registry import Registry

PROJECT_NAME = "outrider"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def outrider_register(registry: "Registry") -> None:
    """Add this plugin's extensions with ``registry.add(Extension(...))``.

    Called once at startup, before any configuration is read. Registering a name
    that another distribution already registered in the same category is a
    startup error that names both distributions.
    """


@hookspec
def outrider_config_loaded(config: dict[str, Any]) -> None:
    """A configuration file was loaded and fully validated.

    ``config`` is the plain (already validated) configuration mapping. Called on
    startup and on every accepted reload. Must not modify ``config``.
    """


@hookspec
def outrider_server_started(server: Any) -> None:
    """All listeners are bound and the admin interface is serving.

    With ``workers: N`` this runs in every process: in each worker (its
    listeners bound; ``server.role == "worker"``) and in the supervisor
    (admin and sinks; ``"supervisor"``). Extension factories run in every
    process too, the supervisor included (it builds the config to answer
    the admin), so keep connections and threads out of factories: start
    them when traffic or this hook calls for them."""


@hookspec
def outrider_draining(server: Any) -> None:
    """The server stopped accepting new connections and is draining the rest."""


@hookspec
def outrider_server_stopped(server: Any) -> None:
    """The server has stopped; release anything held (files, sockets, threads)."""
