"""The HTTP filter API: what an ``filters.http`` extension implements.

A filter instance lives for one request (one "stream"). The connection
manager calls, in order, ``on_request_headers`` → ``on_request_body`` (per
chunk) → ``on_request_trailers`` through the filters as configured, and
``on_response_*`` through them in reverse. Each method may return:

``None`` (or :data:`CONTINUE`)
    pass the event on to the next filter;
:data:`STOP`
    hold the chain here; events that arrive meanwhile are queued (reading
    from the client pauses once the queue passes the buffer limit) and the
    filter later calls ``self.stream.resume_request()`` / ``resume_response()``
    (the terminal filter's result is ignored: nothing follows it);
``bytes`` (body methods only)
    the chunk to pass on instead (``b""`` swallows it — a buffering filter
    returns ``b""`` for each chunk and the whole body with ``end_stream``).

Any method may answer the request itself with
``self.stream.send_local_reply(status, body)``; the chain stops there, and
the reply goes through the response methods of the filters before this one
(not this one, nor those after it).
An exception in a filter fails only that request: a 500 (or a reset when the
response has started) that travels as a local reply from that filter would,
the stat ``http.<prefix>.filter_error`` and a log line naming the extension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from .conn_manager import ActiveStream
    from .message import Headers, RequestHead, ResponseHead

CONTINUE = None
STOP = "stop"


class HttpFilter:
    """Base class of HTTP filters. Override only the methods you need: the
    chain skips, at config time, every method a filter class leaves alone."""

    #: The extension name, set by the core when the chain is built (for logs).
    extension_name: str = ""
    #: A terminal filter (the router) ends the chain: it must be the last one
    #: and it is what answers the request.
    terminal: bool = False

    def __init__(self, stream: "ActiveStream", config: Any = None) -> None:
        self.stream = stream
        self.config = config

    def on_request_headers(self, request: "RequestHead", end_stream: bool) -> Any:
        return None

    def on_request_body(self, chunk: bytes, end_stream: bool) -> Any:
        return None

    def on_request_trailers(self, trailers: "Headers") -> Any:
        return None

    def on_response_headers(self, response: "ResponseHead", end_stream: bool) -> Any:
        return None

    def on_response_body(self, chunk: bytes, end_stream: bool) -> Any:
        return None

    def on_response_trailers(self, trailers: "Headers") -> Any:
        return None

    def on_destroy(self) -> None:
        """The stream is finished or reset; release what the filter holds."""


class HttpFilterFactory:
    """What a ``filters.http`` extension's factory returns: built once per
    configured use, called once per request to make the filter instance.

    ``HttpFilterFactory(MyFilter, parsed_config)`` makes ``MyFilter(stream,
    parsed_config)`` for every request.
    """

    __slots__ = ("filter_class", "config", "extension_name")

    def __init__(self, filter_class: type[HttpFilter], config: Any = None) -> None:
        self.filter_class = filter_class
        self.config = config
        self.extension_name = ""

    def __call__(self, stream: "ActiveStream") -> HttpFilter:
        return self.filter_class(stream, self.config)


def overrides(filter_class: type, method: str) -> bool:
    """Whether ``filter_class`` implements ``method`` itself (not the no-op base)."""
    return getattr(filter_class, method) is not getattr(HttpFilter, method)


FilterFactory = Callable[["ActiveStream"], HttpFilter]
