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
        # Like the two above, it is meant for the next hop only (RFC 9110 11.7.2).
        "proxy-authentication-info",
    )
)

# Connection options that name no header; content-length is never dropped.
_CONNECTION_OPTIONS = frozenset(("close", "keep-alive", "content-length", ""))
# Connection values recur ("keep-alive", "close"): their named sets are kept.
_NAMED_CACHE: dict[str, frozenset[str]] = {}
_NAMED_CACHE_MAX = 256


def connection_named(value: str) -> frozenset[str]:
    """The header names a ``Connection`` value lists, its options aside."""
    named = _NAMED_CACHE.get(value)
    if named is None:
        named = frozenset(token.strip().lower() for token in value.split(",")) - _CONNECTION_OPTIONS
        if len(_NAMED_CACHE) >= _NAMED_CACHE_MAX:
            _NAMED_CACHE.clear()
        _NAMED_CACHE[value] = named
    return named


def strip_hop_by_hop(headers: Headers) -> None:
    """Remove hop-by-hop headers in place, including those that ``Connection``
    names (RFC 9110 7.6.1). ``TE: trailers`` is kept: it is end to end in
    effect (gRPC relies on it)."""
    for name, _ in headers:
        if name in HOP_BY_HOP:
            break
    else:
        return
    removed = [kv for kv in headers if kv[0] in HOP_BY_HOP]
    headers[:] = [kv for kv in headers if kv[0] not in HOP_BY_HOP]
    finish_hop_by_hop(headers, removed)


def finish_hop_by_hop(headers: Headers, removed: list[tuple[str, str]]) -> None:
    """``removed``, the hop-by-hop fields, were taken out of ``headers``:
    also remove the fields that its ``Connection`` headers name, and put a
    ``TE: trailers`` back (last)."""
    drop: frozenset[str] | None = None
    keep_te = None
    for name, value in removed:
        if name == "connection":
            named = _NAMED_CACHE.get(value)  # connection_named(), inlined for a known value
            if named is None:
                named = connection_named(value)
            if named:
                drop = named if drop is None else drop | named
        elif name == "te" and value.strip().lower() == "trailers":
            keep_te = (name, value)
    if drop is not None:
        headers[:] = [kv for kv in headers if kv[0] not in drop]
    if keep_te is not None:
        headers.append(keep_te)
