"""Hop-by-hop headers: they belong to one connection and are never forwarded."""

from __future__ import annotations

from outrider.http.message import Headers

HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    )
)


def strip_hop_by_hop(headers: Headers) -> None:
    """Remove hop-by-hop headers in place, including those that ``Connection``
    names (RFC 9110 7.6.1). ``TE: trailers`` is kept: it is end to end in
    effect (gRPC relies on it)."""
    found = False
    for name, _ in headers:
        if name in HOP_BY_HOP:
            found = True
            break
    if not found:
        return
    drop = set(HOP_BY_HOP)
    for name, value in headers:
        if name == "connection":
            drop.update(token.strip().lower() for token in value.split(","))
    drop.discard("content-length")
    keep_te = [kv for kv in headers if kv[0] == "te" and kv[1].strip().lower() == "trailers"]
    headers[:] = [kv for kv in headers if kv[0] not in drop] + keep_te
