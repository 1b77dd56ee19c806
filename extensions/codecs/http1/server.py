"""The downstream side of HTTP/1.1: one asyncio Protocol per client connection.

Requests are handled one at a time, in order: the parser pauses after each
complete request, so pipelined requests wait in its buffer (bounded: reading
from the socket pauses when it grows) and are answered in order.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from outrider.http.message import Headers, ResponseHead
from outrider.write_batch import BatchedWriter

from .parser import LAST_CHUNK, ParseError, RequestParser, encode_chunk, encode_trailers, serialize_response_head

if TYPE_CHECKING:  # pragma: no cover
    from outrider.http.conn_manager import ActiveStream, HttpConnectionManager
    from outrider.listener import Listener

log = logging.getLogger("outrider.http1")

_NO_BODY_STATUSES = frozenset((204, 304))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Bytes of unparsed pipelined input we hold before we stop reading the socket.
_MAX_BUFFERED_INPUT = 256 * 1024


def error_response(status: int, body: str) -> bytes:
    """A complete, self-framed error response that closes the connection."""
    payload = body.encode()
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    ).encode() + payload


class Http1ServerConnection(BatchedWriter, asyncio.Protocol):
    """One client connection speaking HTTP/1.1 (or 1.0).

    Writes wait for the end of the loop's batch of events (write_batch.py),
    which also puts a response head and its first body chunk in one writev.
    """

    def __init__(self, hcm: "HttpConnectionManager", listener: "Listener") -> None:
        self.hcm = hcm
        self.listener = listener
        self.stats = hcm.stats
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(
            self,
            max_header_bytes=hcm.max_request_headers_bytes,
            max_headers=hcm.max_headers_count,
            drop_hop_by_hop=True,
        )
        self.stream: "ActiveStream | None" = None
        self.remote_ip = ""
        self.remote_port = 0
        self.scheme = "http"
        self.closed = False
        self.draining = False
        self._keep_alive = True
        self._chunked_response = False
        self._head_request = False
        self._no_response_body = False
        self._trailers: Headers | None = None
        self._request_has_body = False
        self._pause_reasons = 0
        self._write_paused = False
        # Timeouts are deadlines checked by one lazily re-armed timer: a
        # keep-alive request then costs two float stores, not two timers.
        self._headers_deadline = 0.0  # loop time; 0: no request head in progress
        self._idle_deadline = 0.0  # loop time; 0: not idle (or no idle timeout)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._loop = asyncio.get_event_loop()
        self.init_batched_writes(self._loop)

    # -- transport events ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.listener.connection_opened(self):
            transport.abort()  # type: ignore[attr-defined]
            self.closed = True
            return
        stats = self.stats
        stats.downstream_cx_total.value += 1
        stats.downstream_cx_active.value += 1
        peer = transport.get_extra_info("peername")
        self.remote_ip = peer[0] if peer else ""
        self.remote_port = peer[1] if peer else 0
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self.stats.downstream_cx_rx_bytes_total.value += len(data)
        if self.stream is None and not self._headers_deadline:
            # The first byte of a new request: it now has request_headers_timeout
            # to complete its head.
            self._idle_deadline = 0.0
            timeout = self.hcm.request_headers_timeout
            if timeout:
                self._headers_deadline = deadline = self._loop.time() + timeout
                if self._timer is None or self._timer_when > deadline:
                    self._schedule(deadline)
        try:
            self.parser.feed(data)
        except ParseError as err:
            self._on_parse_error(err)
            return
        if self.parser.buffered > _MAX_BUFFERED_INPUT:
            self.pause_reading()

    def eof_received(self) -> bool:
        try:
            self.parser.feed_eof()
        except ParseError as err:
            if self.stream is not None or not self.parser.idle():
                self._on_parse_error(err)
        # Half-closed by the client: finish the response in flight (if any), then close.
        if self.stream is None:
            self.close()
        else:
            self._keep_alive = False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.on_downstream_reset("downstream_remote_disconnect")
        if self.transport is not None and self in self.listener.connections:
            self.stats.downstream_cx_active.value -= 1
            self.stats.downstream_cx_destroy.value += 1
        self.listener.connection_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.stream is not None:
            self.stream.on_downstream_write_paused()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.stream is not None:
            self.stream.on_downstream_write_resumed()

    # -- parser callbacks --------------------------------------------------

    def on_request_head(self, head: Any) -> None:
        self._headers_deadline = 0.0
        head.scheme = self.scheme  # the parser left the hop-by-hop headers out
        self._keep_alive = head.keep_alive and not self.draining
        self._head_request = head.method == "HEAD"
        self._request_has_body = head.chunked or bool(head.content_length)
        self._trailers = None
        self.stats.downstream_rq_http1_total.value += 1
        stream = self.stream = self.hcm.new_stream(self, head)
        if self._write_paused:  # still behind with the previous response
            stream.on_downstream_write_paused()
        stream.decode_headers(not self._request_has_body)

    def on_body(self, data: bytes) -> None:
        stream = self.stream
        if stream is not None:
            stream.decode_body(data, False)

    def on_trailers(self, trailers: Headers) -> None:
        self._trailers = trailers

    def on_message_complete(self) -> bool:
        stream = self.stream
        if stream is not None and self._request_has_body:
            if self._trailers:
                stream.decode_trailers(self._trailers)
            else:
                stream.decode_body(b"", True)
        # One request at a time: hold pipelined requests in the parser until
        # this response is done (stream_done resumes).
        return self.stream is not None

    # -- the stream's encoder --------------------------------------------

    def encode_headers(self, stream: "ActiveStream", head: ResponseHead, end_stream: bool) -> None:
        headers = head.headers
        status = head.status
        self._no_response_body = self._head_request or status in _NO_BODY_STATUSES or status < 200
        chunked = False
        if not self._no_response_body:
            if head.content_length is not None and headers.has("content-length"):
                pass
            elif end_stream:
                headers.set("content-length", "0")
            elif stream.request.version == "HTTP/1.1":
                chunked = True
                headers.append(("transfer-encoding", "chunked"))
            else:
                # An HTTP/1.0 client cannot take chunks: the end of the
                # connection marks the end of the body.
                self._keep_alive = False
        elif status in _NO_BODY_STATUSES:
            headers.remove_all("content-length")
        if not stream.request_complete:
            # We won't read the rest of an unanswered body just to discard it.
            self._keep_alive = False
        if self.draining:
            self._keep_alive = False
        if not self._keep_alive:
            headers.append(("connection", "close"))
        elif stream.request.version == "HTTP/1.0":
            headers.append(("connection", "keep-alive"))
        self._chunked_response = chunked
        self._write(serialize_response_head(head))

    def encode_body(self, stream: "ActiveStream", data: bytes, end_stream: bool) -> None:
        if self._no_response_body:
            return
        if self._chunked_response:
            out = encode_chunk(data)
            if end_stream:
                out += LAST_CHUNK
        else:
            out = data
        if out:
            self._write(out)

    def encode_trailers(self, stream: "ActiveStream", trailers: Headers) -> None:
        if self._chunked_response:
            self._write(encode_trailers(trailers))

    def send_continue(self, stream: "ActiveStream") -> None:
        self._write(_CONTINUE)

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.stats.downstream_cx_tx_bytes_total.value += len(data)
            self.batched_write(data)

    def stream_done(self, stream: "ActiveStream") -> None:
        """The stream finished (its response is written) or was reset."""
        if self.stream is not stream:
            return
        self.stream = None
        if self.closed:
            return
        if not stream.response_complete:
            # Reset mid-way: HTTP/1.1 has no other way to say so. What the
            # client was sent so far still goes first, as it would unbatched.
            self._abort()
            return
        if not self._keep_alive:
            self.close()
            return
        self._arm_idle_timer()
        if self._pause_reasons:
            self._pause_reasons = 0
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.parser.paused:
            try:
                self.parser.resume()
            except ParseError as err:
                self._on_parse_error(err)

    def reset_stream(self, stream: "ActiveStream", reason: str) -> None:
        if not self.closed and self.transport is not None:
            if stream.response_started:
                self._abort()
            else:
                self.close()

    # -- flow control asked for by the stream -----------------------------

    def pause_reading(self) -> None:
        self._pause_reasons += 1
        if self._pause_reasons == 1 and not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if self._pause_reasons:
            self._pause_reasons -= 1
            if self._pause_reasons == 0 and not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    # -- errors, timeouts, draining ---------------------------------------

    def _on_parse_error(self, err: ParseError) -> None:
        self.stats.protocol_error(err.reason)
        log.info(
            "downstream %s: malformed request (%s%s); answering %d and closing",
            self.remote_ip, err.reason, f": {err.detail}" if err.detail else "", err.status,
        )
        stream = self.stream
        if stream is not None and not stream.response_started:
            self._keep_alive = False
            stream.send_local_reply(err.status, f"{err.reason}\n", details=f"http1.{err.reason}")
            self.close()
        elif stream is not None:
            stream.reset(f"http1.{err.reason}")
        else:  # the head itself: no stream to answer through
            body = f"{err.reason}\n"
            self._write(error_response(err.status, body))
            self.hcm.request_rejected(self, err.status, f"http1.{err.reason}", len(body))
            self.close()

    def _arm_idle_timer(self) -> None:
        timeout = self.hcm.idle_timeout
        if timeout:
            self._idle_deadline = deadline = self._loop.time() + timeout
            if self._timer is None or self._timer_when > deadline:
                self._schedule(deadline)

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self._loop.time()
        headers, idle = self._headers_deadline, self._idle_deadline
        if headers and self.stream is None:
            if now >= headers:
                self.stats.downstream_rq_header_timeout.value += 1
                log.info("downstream %s: request headers not complete within %.3gs; closing", self.remote_ip, self.hcm.request_headers_timeout)
                self._write(error_response(408, "request_headers_timeout\n"))
                self.close()
                return
        elif idle and self.stream is None:
            if now >= idle:
                self.stats.downstream_cx_idle_timeout.value += 1
                self.close()
                return
        # Not due yet: the deadlines moved since this timer was set.
        pending = [d for d in (headers, idle) if d]
        if pending:
            self._schedule(min(pending))

    def start_drain(self) -> None:
        """The listener is draining: finish the request in flight, then close."""
        self.draining = True
        if self.stream is None:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.close_after_writes()

    def _abort(self) -> None:
        self.flush_writes()
        self.closed = True
        self.transport.abort()  # type: ignore[union-attr]
