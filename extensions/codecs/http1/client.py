"""The upstream side of HTTP/1.1: a pooled client connection.

One request at a time per connection (no upstream pipelining); the pool
hands the connection back out once both the request and its response are
complete and the upstream kept the connection alive.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from outrider.http.message import Headers, RequestHead
from outrider.write_batch import BatchedWriter

from .parser import LAST_CHUNK, ParseError, ResponseParser, encode_chunk, encode_trailers, serialize_request_head

if TYPE_CHECKING:  # pragma: no cover
    from outrider.pool import ConnectionPool

log = logging.getLogger("outrider.http1")

_NO_BODY_STATUSES = frozenset((204, 304))


class UpstreamHandler:
    """What the client connection reports to (the router's upstream request)."""

    def on_upstream_headers(self, head: Any, end_stream: bool) -> None: ...
    def on_upstream_body(self, data: bytes, end_stream: bool) -> None: ...
    def on_upstream_trailers(self, trailers: Headers) -> None: ...
    def on_upstream_reset(self, reason: str, detail: str) -> None:
        """``reason``: ``connection_termination`` or ``protocol_error``."""
    def on_upstream_write_paused(self) -> None: ...
    def on_upstream_write_resumed(self) -> None: ...


class Http1ClientConnection(BatchedWriter, asyncio.Protocol):
    """One pooled upstream connection; its writes wait for the end of the
    loop's batch of events (write_batch.py)."""

    def __init__(self, pool: "ConnectionPool") -> None:
        self.pool = pool
        self.stats = pool.cluster.stats
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(self, drop_hop_by_hop=True)
        self.handler: Any = None
        self.closed = False
        self.requests = 0
        self._keep_alive = True
        self._chunked_request = False
        self._request_done = False
        self._response_done = False
        self._response_ended = False
        self._method = "GET"
        self._trailers: Headers | None = None
        self._reading_paused = False
        self.init_batched_writes(asyncio.get_event_loop())

    # -- pool interface ---------------------------------------------------

    def is_reusable(self) -> bool:
        if self.closed or not self._keep_alive or self.handler is not None:
            return False
        limit = self.pool.cluster.max_requests_per_connection
        return limit is None or self.requests < limit

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.close_after_writes()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()

    # -- sending the request ----------------------------------------------

    def start_request(self, handler: Any, head: RequestHead, end_stream: bool) -> None:
        self.handler = handler
        self.requests += 1
        self._request_done = end_stream
        self._response_done = False
        self._response_ended = False
        self._method = head.method
        self._trailers = None
        headers = head.headers
        chunked = False
        if end_stream:
            if head.content_length is None and head.method in ("POST", "PUT", "PATCH"):
                headers.append(("content-length", "0"))
        elif head.content_length is None or not headers.has("content-length"):
            chunked = True
            headers.append(("transfer-encoding", "chunked"))
        self._chunked_request = chunked
        self.parser.expect(head.method)
        self._write(serialize_request_head(head))

    def send_body(self, data: bytes, end_stream: bool) -> None:
        if self._chunked_request:
            out = encode_chunk(data)
            if end_stream:
                out += LAST_CHUNK
        else:
            out = data
        if end_stream:
            self._request_done = True
        if out:
            self._write(out)
        if end_stream:
            self._maybe_release()

    def send_trailers(self, trailers: Headers) -> None:
        self._request_done = True
        self._write(encode_trailers(trailers) if self._chunked_request else b"")
        self._maybe_release()

    def _write(self, data: bytes) -> None:
        if not self.closed and data:
            self.stats.upstream_cx_tx_bytes_total.value += len(data)
            self.batched_write(data)

    def detach(self) -> None:
        """The request was abandoned mid-way: this connection can't be reused."""
        self.handler = None
        self.abort()

    # -- transport events -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        self.stats.upstream_cx_rx_bytes_total.value += len(data)
        try:
            self.parser.feed(data)
        except ParseError as err:
            self._protocol_error(err)

    def eof_received(self) -> bool:
        self._keep_alive = False
        try:
            self.parser.feed_eof()  # completes a response delimited by the close
        except ParseError:
            # Closed before the response was complete: not a malformed
            # response but a connection termination (Envoy's UC), which
            # connection_lost reports. Abort: a close would first wait for
            # request bytes the upstream may never read.
            self.abort()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        handler, self.handler = self.handler, None
        if handler is not None and not self._response_ended:
            self.stats.upstream_cx_close_notify.value += 1
            handler.on_upstream_reset("connection_termination", str(exc) if exc else "upstream closed the connection")
        self.pool.connection_closed(self)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.on_upstream_write_paused()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.on_upstream_write_resumed()

    def pause_reading(self) -> None:
        if not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    # -- parser callbacks -------------------------------------------------

    def on_informational(self, head: Any) -> None:
        # 100 Continue and friends: the proxy answered Expect itself.
        pass

    def on_response_head(self, head: Any) -> None:
        # The parser left the hop-by-hop headers out.
        self._keep_alive = head.keep_alive
        ended = (
            self._method == "HEAD"
            or head.status in _NO_BODY_STATUSES
            or (head.content_length == 0 and not head.chunked)
        )
        self._response_ended = ended
        if self.handler is not None:
            self.handler.on_upstream_headers(head, ended)

    def on_body(self, data: bytes) -> None:
        handler = self.handler
        if handler is not None:
            if self.parser.at_body_end:
                # Saves a pass through the filter chain for an empty end.
                self._response_ended = True
                handler.on_upstream_body(data, True)
            else:
                handler.on_upstream_body(data, False)

    def on_trailers(self, trailers: Headers) -> None:
        self._trailers = trailers

    def on_message_complete(self) -> bool:
        handler = self.handler
        self._response_done = True
        if not self._response_ended:
            self._response_ended = True
            if handler is not None:
                if self._trailers:
                    handler.on_upstream_trailers(self._trailers)
                else:
                    handler.on_upstream_body(b"", True)
        if not self._request_done:
            # The upstream answered before reading the whole request: the
            # connection's state is unknown, so it is not reused.
            self._keep_alive = False
        self._maybe_release()
        # Keep parsing: bytes after a response with no request outstanding
        # are a protocol error the parser reports itself.
        return False

    def _maybe_release(self) -> None:
        if self._response_done and self._request_done and self.handler is not None:
            self.handler = None
            if self._reading_paused:  # back to the pool reading, whoever paused it
                self.resume_reading()
            self.pool.release(self)

    def _protocol_error(self, err: ParseError) -> None:
        self.stats.upstream_cx_protocol_error.value += 1
        log.warning("cluster %s: malformed response from %s (%s%s)", self.pool.cluster.name, self.pool.host.address, err.reason, f": {err.detail}" if err.detail else "")
        handler, self.handler = self.handler, None
        self._keep_alive = False
        self.abort()
        if handler is not None:
            handler.on_upstream_reset("protocol_error", err.reason)
