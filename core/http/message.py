"""Request and response heads as filters see them.

Header names are lower-case ``str``; values are ``str`` decoded as latin-1, so
any byte round-trips unchanged. The request's ``Host`` is carried as
``authority`` (HTTP/2's ``:authority``) rather than in ``headers``.
"""

from __future__ import annotations

from typing import Iterator


class Headers(list):
    """An ordered multi-map of ``(name, value)`` pairs, names lower-case.

    It is a ``list`` of tuples so that codecs can build it with ``append`` and
    serialise it with one join; the methods below are for filters.
    """

    __slots__ = ()

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (lower-case), or ``default``."""
        for k, v in self:
            if k == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self if k == name]

    def add(self, name: str, value: str) -> None:
        self.append((name.lower(), value))

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` header with one ``name: value`` (at the end)."""
        name = name.lower()
        self.remove_all(name)
        self.append((name, value))

    def remove_all(self, name: str) -> int:
        """Remove every ``name`` header; returns how many were removed."""
        # Usually there is none, or one: find it and delete it in place, and
        # build a new list only when there are more (the core calls this on
        # every response, for ``server``).
        i = 0
        for k, _ in self:
            if k == name:
                break
            i += 1
        else:
            return 0
        del self[i]
        for k, _ in self:
            if k == name:
                before = len(self)
                self[:] = [kv for kv in self if kv[0] != name]
                return 1 + before - len(self)
        return 1

    def has(self, name: str) -> bool:
        for k, _ in self:
            if k == name:
                return True
        return False

    def names(self) -> Iterator[str]:
        return (k for k, _ in self)


class RequestHead:
    """The start line and headers of a request."""

    __slots__ = (
        "method",
        "path",
        "authority",
        "scheme",
        "version",
        "headers",
        "keep_alive",
        "expect_continue",
        "content_length",
        "chunked",
    )

    def __init__(
        self,
        method: str,
        path: str,
        authority: str,
        headers: Headers,
        version: str = "HTTP/1.1",
        scheme: str = "http",
        keep_alive: bool = True,
        expect_continue: bool = False,
        content_length: int | None = None,
        chunked: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.headers = headers
        self.version = version
        self.scheme = scheme
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        #: The body's framing as received: a length, or ``chunked``, or neither
        #: (no body). Filters that change the body adjust these.
        self.content_length = content_length
        self.chunked = chunked

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def __repr__(self) -> str:
        return f"<RequestHead {self.method} {self.authority}{self.path} {self.version}>"


class ResponseHead:
    """The status line and headers of a response."""

    __slots__ = ("status", "reason", "headers", "version", "keep_alive", "content_length", "chunked")

    def __init__(
        self,
        status: int,
        headers: Headers,
        reason: str = "",
        version: str = "HTTP/1.1",
        keep_alive: bool = True,
        content_length: int | None = None,
        chunked: bool = False,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status}>"
