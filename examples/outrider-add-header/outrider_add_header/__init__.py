"""add_header: adds request and response headers; can require a request header.

A complete third-party Outrider extension: a filter class, a factory that
prepares its config once, and the registration hook.
"""

from __future__ import annotations

from typing import Any

from outrider import (
    BuildContext, Extension, HttpFilter, HttpFilterFactory, Registry, RequestHead, ResponseHead, StatsGroup, hookimpl,
)


class AddHeaderStats(StatsGroup):
    COUNTERS = ("added", "rejected")


class AddHeaderConfig:
    """The validated config, turned once into what the hot path needs."""

    def __init__(self, config: dict[str, Any], ctx: BuildContext) -> None:
        self.request_headers = [(k.lower(), v) for k, v in config.get("request_headers", {}).items()]
        self.response_headers = [(k.lower(), v) for k, v in config.get("response_headers", {}).items()]
        required = config.get("require_header")
        self.require_header = required.lower() if required else None
        self.stats = AddHeaderStats(ctx.stats.scope(f"add_header.{config.get('stat_prefix', 'add_header')}"))


class AddHeader(HttpFilter):
    config: AddHeaderConfig

    def on_request_headers(self, request: RequestHead, end_stream: bool) -> Any:
        cfg = self.config
        if cfg.require_header and not request.headers.has(cfg.require_header):
            cfg.stats.rejected.inc()
            self.stream.send_local_reply(403, f"missing {cfg.require_header}\n", details="add_header.missing_header")
            return
        request.headers.extend(cfg.request_headers)
        cfg.stats.added.inc()

    def on_response_headers(self, response: ResponseHead, end_stream: bool) -> Any:
        response.headers.extend(self.config.response_headers)


def create(config: dict[str, Any], ctx: BuildContext) -> HttpFilterFactory:
    return HttpFilterFactory(AddHeader, AddHeaderConfig(config, ctx))


@hookimpl
def outrider_register(registry: Registry) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="add_header",
            category="filters.http",
            factory=create,
            status="alpha",
            security_posture="unknown",
            description="Adds request and response headers; can require a request header.",
        )
    )
