"""HTTP/1.1 codec: the wire format for listeners (``codec: http1``/``auto``)
and for clusters (``protocol: http1``)."""

from __future__ import annotations

from typing import Any, Callable

from outrider import BuildContext, Extension, hookimpl

from .client import Http1ClientConnection
from .server import Http1ServerConnection


class Http1Codec:
    """Makes HTTP/1.1 protocols for listeners and for connection pools."""

    name = "http1"

    def server_protocol_factory(self, hcm: Any, listener: Any) -> Callable[[], Http1ServerConnection]:
        return lambda: Http1ServerConnection(hcm, listener)

    def client_protocol_factory(self, pool: Any) -> Http1ClientConnection:
        return Http1ClientConnection(pool)


def create(config: dict[str, Any], ctx: BuildContext) -> Http1Codec:
    return Http1Codec()


@hookimpl
def outrider_register(registry: Any) -> None:
    registry.add(
        Extension.from_module(
            __name__,
            name="http1",
            category="codecs",
            factory=create,
            status="stable",
            security_posture="robust_to_untrusted_downstream",
            description="HTTP/1.1 and HTTP/1.0: keep-alive, chunked bodies, pipelining, strict parsing.",
        )
    )
