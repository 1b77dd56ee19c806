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

# Connection options that name no header; content-length is never dropped.
_CONNECTION_OPTIONS = frozenset(("close", "keep-alive", "content-length", ""))


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
    drop = HOP_BY_HOP
    keep_te = None
    for name, value in headers:
        if name == "connection":
            named = {token.strip().lower() for token in value.split(",")} - _CONNECTION_OPTIONS
            if named:
                drop = drop | named
        elif name == "te" and value.strip().lower() == "trailers":
            keep_te = (name, value)
    headers[:] = [kv for kv in headers if kv[0] not in drop]
    if keep_te is not None:
        headers.append(keep_te)
