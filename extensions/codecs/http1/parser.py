"""Sans-I/O HTTP/1.1 parsers and serialisers: the http1 codec's hot path.

No sockets and no asyncio here: the connection feeds bytes in, and the parser
calls its handler back with heads, body chunks, trailers and "message
complete". Parsing is strict in the way Envoy's and llhttp's strict modes are,
because an ambiguity a proxy tolerates is a request-smuggling hole between it
and the next hop: lines end in CRLF, framing headers are exact, and every
violation is a :class:`ParseError` carrying the status the proxy answers and a
short reason code for stats and logs.

Speed comes from doing per-message work in C, and from not redoing the work
for lines seen before: the end of a head is found with one ``bytes.find``
that never rescans, the head is decoded once (latin-1, so every byte
round-trips) and split once, and each header line is looked up whole in a
bounded dict of lines already parsed and checked, so that a recurring line
(most are: same clients, same upstreams) costs one lookup. Only a line seen
for the first time is split, trimmed and checked for control characters and
bare CR/LF; status lines are cached the same way. A whole-head
``bytes.translate`` runs on the error path only, so that a bad character
stays the error reported whatever else is wrong. Body bytes are handed out
as slices of what was fed (the whole fed object when it is all body), never
accumulated.

Measured on this machine (CPython 3.11.7, ``timeit``, best of 7, no-op
handler methods; a slow 2-vCPU Xeon where a bare ``bytes.find`` over a
250-byte head already costs ~0.15 us):

* a typical GET (request line + 6 headers, 250 bytes), one ``feed``:
  ~2.5 us on a kept-alive parser, ~2.9 us including creating the parser;
* a 200 response with 5 headers and a 13-byte content-length body, from
  ``expect`` to ``on_message_complete``: ~2.5 us (~3.0 us with a new parser);
* ``serialize_request_head`` of that GET: ~1.0 us.

About 0.6 us of that GET is the header loop with every line cached (~0.08 us
a line); a line not seen before costs ~0.3 us more. The rest is split
between finding, decoding and splitting the head in the run loop (~1 us) and
the request line, framing, the head object and the callbacks (~0.9 us).

The optional C accelerator (``_speedups.c``, end of this module) replaces
the serialisers, the header loop (``_read_fields``), the decoding and
splitting of a head into lines (``_split_head``) and the request line
(``_request_line``; only the common case, anything else goes to the Python
version) with the same semantics: ~0.23 us for that serialisation; ~0.25
instead of ~0.4 us to split that head, ~0.1 instead of ~0.3 us for its
request line. Measured in one process against the Python ``_split_head``
and ``_request_line`` (the rest in C either way), that GET costs ~2.25
instead of ~2.75 us and that response ~2.55 instead of ~2.8 us. Pure
Python, these are function calls (~0.1 us each more than the inlined code
they were). Left in Python per head: the run loop (one ``bytes.find`` for
the CRLFCRLF, ~0.15 us, and its bookkeeping), the status line cache
lookup, framing, the head object and the callbacks.
"""

from __future__ import annotations

import os
import re
from collections import deque
from http import HTTPStatus
from typing import Protocol

from outrider.http.message import Headers, RequestHead, ResponseHead

from .framing import HOP_BY_HOP, finish_hop_by_hop

__all__ = [
    "LAST_CHUNK",
    "ParseError",
    "RequestHandler",
    "RequestParser",
    "ResponseHandler",
    "ResponseParser",
    "encode_chunk",
    "encode_trailers",
    "serialize_request_head",
    "serialize_response_head",
]


class ParseError(Exception):
    """Malformed or unsupported input.

    ``status`` is what the proxy answers (400, 431, 501, 505 for requests; 502
    for anything wrong in a response); ``reason`` is a snake_case code for stat
    names and logs; ``detail`` is free text for humans.
    """

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(status, reason, detail)
        self.status = status
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        text = f"{self.status} {self.reason}"
        return f"{text}: {self.detail}" if self.detail else text


class RequestHandler(Protocol):
    """What :class:`RequestParser` calls."""

    def on_request_head(self, head: RequestHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_trailers(self, trailers: Headers) -> None: ...
    def on_message_complete(self) -> bool | None: ...


class ResponseHandler(Protocol):
    """What :class:`ResponseParser` calls."""

    def on_informational(self, head: ResponseHead) -> None: ...
    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_trailers(self, trailers: Headers) -> None: ...
    def on_message_complete(self) -> bool | None: ...


# --------------------------------------------------------------------------
# Character classes and limits

_TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"  # RFC 9110 5.6.2
_TOKEN = re.compile(f"[{_TCHAR}]+")
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
# reg-name / IP-literal / IPv4 plus an optional port (RFC 3986 3.2.2); no
# userinfo, no whitespace, no "/" or "?" that could shift routing.
_HOST = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:\[\]%]*")

# Bytes a head may hold besides its CRLFs: HTAB, SP, VCHAR, obs-text. Deleting
# them leaves only control characters, so a clean head translates to exactly
# its CRLF separators (any extra byte is a CTL, a bare CR or a bare LF).
_FIELD_BYTES = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
# Control characters a field value (or reason phrase) must not hold; searched
# only when ``str.isprintable`` has failed, which HTAB and obs-text also fail.
_VALUE_CTL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
# The first offending character of a head, for the error path only.
_BAD_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
# The same, over an unterminated head, so that a client that ends lines with
# a bare LF is refused at once instead of waiting for a CRLFCRLF that never
# comes. A CR at the very end of the data is not judged until the next byte.
_PARTIAL_BAD = re.compile(b"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r[^\n]|[^\r]\n")

# chunk = chunk-size [ chunk-ext ] CRLF (RFC 9112 7.1); extensions are parsed
# to be refused when malformed, then dropped.
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_TOKEN_B = b"[" + _TCHAR.encode() + b"]+"
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})"
    rb"(?:[ \t]*;[ \t]*" + _TOKEN_B + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN_B + b"|" + _QUOTED + rb"))?)*"
)
_MAX_CHUNK_LINE = 4096
_MAX_BLANK_LINES = 8  # CRLFs tolerated before a request line (RFC 9112 2.2)
_MAX_INFORMATIONAL = 16  # 1xx responses tolerated before a final one
_CACHE_MAX = 1024

_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))

#: Validated header names as received -> lower-case. Shared by all parsers;
#: bounded so that random names cannot grow it without limit.
_NAME_CACHE: dict[str, str] = {}
# Seed both spellings of common names so most heads never miss.
for _name in (
    "Host", "User-Agent", "Accept", "Accept-Encoding", "Accept-Language", "Accept-Ranges", "Age",
    "Authorization", "Cache-Control", "Connection", "Content-Encoding", "Content-Length", "Content-Type",
    "Cookie", "Date", "ETag", "Expect", "Expires", "If-Modified-Since", "If-None-Match", "Keep-Alive",
    "Last-Modified", "Location", "Origin", "Pragma", "Range", "Referer", "Server", "Set-Cookie", "TE",
    "Trailer", "Transfer-Encoding", "Upgrade", "Vary", "Via", "X-Forwarded-For", "X-Forwarded-Proto",
    "X-Request-Id", "Traceparent", "Tracestate",
):
    _NAME_CACHE[_name] = _NAME_CACHE[_name.lower()] = _name.lower()
del _name

#: Validated names for the serialisers.
_OUT_NAMES: set[str] = set(_NAME_CACHE.values())
#: Host values that passed ``_HOST``.
_HOST_CACHE: set[str] = set()

_REQUEST_SPECIAL = frozenset(("host", "content-length", "transfer-encoding", "connection", "expect"))
_RESPONSE_SPECIAL = frozenset(("content-length", "transfer-encoding", "connection"))
# Framing and routing fields must not arrive late, in trailers, where a
# next hop that merges trailers into headers would act on them.
_FORBIDDEN_TRAILERS = frozenset(("content-length", "transfer-encoding", "host"))
# Every name that is special to some block (hop-by-hop ones too, for parsers
# that drop them): lines with these names are cached apart, in _SPECIAL_CACHE.
_ANY_SPECIAL = _REQUEST_SPECIAL | _RESPONSE_SPECIAL | _FORBIDDEN_TRAILERS | HOP_BY_HOP

# Whole header lines as received -> their parsed (name, value). Most lines
# recur (same clients, same upstreams), and a line seen before then costs one
# dict lookup instead of a partition, a name check, a trim and a character
# check; equal heads also share their field tuples. Only lines that passed
# every check are stored, so a hit is proof that the line holds no control
# character or bare CR/LF. Lines with a special name live in their own dict,
# so that a hit in the main one needs no further test.
#
# Attackers choose these keys: each dict is emptied when full (self-healing,
# unlike refusing new entries once full) and long lines are not kept, which
# bounds each dict to about 2.5 MB.
_FIELD_CACHE: dict[str, tuple[str, str]] = {}
_SPECIAL_CACHE: dict[str, tuple[str, str]] = {}
# The same for status lines, which come in few kinds ("200 OK"...). Request
# lines are not cached: their targets vary too much to repay it.
_STATUS_LINES: dict[str, tuple[str, int, str]] = {}
_LINE_CACHE_MAX = 2048
_CACHED_LINE_MAX = 512
# Fields whose value is new in every message by design: storing them would
# only churn the caches.
_UNIQUE_NAMES = frozenset(("x-request-id", "traceparent", "x-b3-traceid", "x-b3-spanid", "x-amzn-trace-id"))

_HEAD, _BODY_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _BODY_EOF = range(7)


def _field_name(line: str, name: str, sep: str, status: int) -> str:
    """Validate a header name missing from the cache; returns it lower-cased."""
    if line[0] == " " or line[0] == "\t":
        raise ParseError(status, "obs_fold", "header line starts with whitespace")
    if not sep:
        raise ParseError(status, "invalid_header_name", "header line without a colon")
    if not name:
        raise ParseError(status, "invalid_header_name", "empty header name")
    if _TOKEN.fullmatch(name) is None:
        if _TOKEN.fullmatch(name.rstrip(" \t")):
            raise ParseError(status, "invalid_header_name", f"whitespace before colon in {name.strip()!r}")
        raise ParseError(status, "invalid_header_name", f"invalid header name {name[:64]!r}")
    lname = name.lower()
    if len(_NAME_CACHE) < _CACHE_MAX:
        _NAME_CACHE[name] = lname
    return lname


def _new_field(line: str, status: int) -> tuple[str, str]:
    """Parse and check a header line missing from the caches, and cache it.

    A control character raises a placeholder error: the caller replaces it
    with the precise one from :func:`_check_block`.
    """
    name, sep, value = line.partition(":")
    lname = _NAME_CACHE.get(name)
    if lname is None or not sep:
        lname = _field_name(line, name, sep, status)
    value = value.strip(" \t")  # not strip(): NBSP (0xa0) is data here
    if not value.isprintable() and _VALUE_CTL.search(value):
        raise ParseError(status, "invalid_header_value", "control character")
    field = (lname, value)
    if len(line) <= _CACHED_LINE_MAX and lname not in _UNIQUE_NAMES:
        cache = _SPECIAL_CACHE if lname in _ANY_SPECIAL else _FIELD_CACHE
        if len(cache) >= _LINE_CACHE_MAX:
            cache.clear()
        cache[line] = field
    return field


def _py_read_fields(
    lines: list[str], first: int, special: frozenset[str], keep_out: str | None, hop_by_hop: frozenset[str] | None,
    status: int,
) -> tuple[Headers, list[tuple[str, str]] | None, list[tuple[str, str]] | None]:
    """Header lines from ``lines[first]`` on -> (Headers, the fields named in
    ``special``, the fields named in ``hop_by_hop``); None for no field.

    A special field named ``keep_out`` (the request's Host) is left out of
    the Headers, and so are the fields named in ``hop_by_hop`` when it is
    given (hop-by-hop dropping). Each line is checked whole, control
    characters included; one found in ``_FIELD_CACHE`` or ``_SPECIAL_CACHE``
    was checked when it was stored, and one in ``_FIELD_CACHE`` has no
    special name. ``_speedups.read_fields`` is this loop in C.
    """
    headers = Headers()
    append = headers.append
    cached = _FIELD_CACHE.get
    specials = hop = None
    for i in range(first, len(lines)):
        line = lines[i]
        field = cached(line)
        if field is None:
            field = _SPECIAL_CACHE.get(line) or _new_field(line, status)
            name = field[0]
            if name in special:
                if specials is None:
                    specials = []
                specials.append(field)
                if name == keep_out:
                    continue
            if hop_by_hop is not None and name in hop_by_hop:
                if hop is None:
                    hop = []
                hop.append(field)
                continue
        append(field)
    return headers, specials, hop


def _py_split_head(buf: bytes | bytearray, start: int, end: int) -> list[str]:
    """The lines of the head or trailer block ``buf[start:end]`` (its final
    CRLFCRLF excluded), decoded as latin-1 so that every byte round-trips.
    ``_speedups.split_head`` is this in C, without the two copies."""
    return buf[start:end].decode("latin-1").split("\r\n")


def _check_block(raw: bytes | bytearray, status: int, first_line_reason: str | None) -> None:
    """Raise the error for the first CTL or bare CR/LF in a head or trailer
    block, if it holds one (error path).

    Blocks are checked line by line, so a parse may stop at another fault
    first; calling this before re-raising makes a bad character win, as when
    whole blocks were checked up front. Deleting the allowed bytes must leave
    exactly the CRLF separators.
    """
    if len(raw.translate(None, _FIELD_BYTES)) != 2 * raw.count(b"\r\n"):
        raise _char_error(raw.decode("latin-1"), status, first_line_reason) from None


def _char_error(text: str, status: int, first_line_reason: str | None) -> ParseError:
    """The error for the first CTL or bare CR/LF in ``text`` (error path)."""
    m = _BAD_CHAR.search(text)
    i = m.start() if m else 0
    char = text[i : i + 1]
    if char in ("\r", "\n"):
        return ParseError(status, "bare_cr_or_lf", f"bare {'CR' if char == chr(13) else 'LF'} at offset {i}")
    line_start = text.rfind("\r\n", 0, i)
    line_start = 0 if line_start < 0 else line_start + 2
    detail = f"control character 0x{ord(char):02x} at offset {i}"
    if line_start == 0 and first_line_reason:
        return ParseError(status, first_line_reason, detail)
    if text.find(":", line_start, i) < 0:
        return ParseError(status, "invalid_header_name", detail)
    return ParseError(status, "invalid_header_value", detail)


def _content_length(values: list[str], status: int) -> tuple[int, bool]:
    """The one length that all Content-Length values agree on, and whether
    the header needs rewriting to a single canonical field."""
    result = -1
    items = 0
    for value in values:
        for item in value.split(",") if "," in value else (value,):
            item = item.strip(" \t")
            # isdecimal, not isdigit: "²" (0xb2) is a digit to Python.
            if not item.isdecimal() or not item.isascii() or len(item) > 19:
                raise ParseError(status, "invalid_content_length", f"invalid Content-Length {item[:32]!r}")
            length = int(item)
            if result < 0:
                result = length
            elif length != result:
                raise ParseError(status, "duplicate_content_length", "differing Content-Length values")
            items += 1
    return result, items > 1


def _connection_tokens(values: list[str]) -> set[str]:
    tokens: set[str] = set()
    for value in values:
        tokens.update(t.strip(" \t").lower() for t in value.split(","))
    return tokens


def _canonical_length(headers: Headers, length: int) -> None:
    """Collapse repeated/listed Content-Length into one field, in place."""
    index = next(i for i, (name, _) in enumerate(headers) if name == "content-length")
    headers.remove_all("content-length")
    headers.insert(index, ("content-length", str(length)))


# --------------------------------------------------------------------------
# Parsers


class _Parser:
    """Buffering, the run loop, bodies and trailers; subclasses parse heads."""

    #: Responses answer every error with 502; requests use the given status.
    _FORCE_STATUS = 0
    _IS_RESPONSE = False
    #: The reason for a bad character in the first line of a head.
    _FIRST_LINE = "invalid_request_line"

    def __init__(
        self, handler, *, max_header_bytes: int = 60 * 1024, max_headers: int = 100, drop_hop_by_hop: bool = False
    ) -> None:
        self._handler = handler
        #: Leave hop-by-hop fields out of the heads' headers (as a proxy must;
        #: see framing.strip_hop_by_hop), while still reading them for framing.
        self._drop_hop_by_hop = drop_hop_by_hop
        self._max_header_bytes = max_header_bytes
        self._max_headers = max_headers
        self._buf = bytearray()  # unparsed bytes kept between feeds
        self._state = _HEAD
        self._scanned = 0  # bytes of the current unterminated head/trailers already searched
        self._remaining = 0  # body bytes left in a content-length body or the current chunk
        self._blank_lines = 0
        self._error: ParseError | None = None
        self._eof = False
        self._eof_done = False
        #: True while the parser holds input back (after ``on_message_complete``
        #: returned truthy, or when the handler sets it); see :meth:`resume`.
        self.paused = False

    # -- public API ------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse as much of ``data`` as possible, calling the handler.

        Raises :class:`ParseError`; after that the parser is dead and every
        later call raises the same error. While paused, data is only kept.
        """
        if self._error is not None:
            raise self._error
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        if not data:
            return
        buf = self._buf
        if buf or self.paused:
            buf += data
            if not self.paused:
                self._process(buf)
        else:
            # Common case: nothing held back, parse the caller's object itself.
            self._process(data)

    def feed_eof(self) -> None:
        """The peer half-closed. Raises :class:`ParseError` if that cuts a
        message short; while paused, the check waits for :meth:`resume`."""
        if self._error is not None:
            raise self._error
        self._eof = True
        if not self.paused:
            self._finish_eof()

    def resume(self) -> None:
        """Un-pause and parse the bytes retained while paused."""
        if not self.paused:
            return
        self.paused = False
        if self._error is not None:
            raise self._error
        if self._buf:
            self._process(self._buf)
        if self._eof and not self.paused:
            self._finish_eof()

    @property
    def at_body_end(self) -> bool:
        """True inside ``on_body`` for the last bytes of a Content-Length
        body (lets a handler end its stream with the data, not after it)."""
        return self._state == _BODY_LENGTH and not self._remaining

    @property
    def buffered(self) -> int:
        """Bytes held unparsed (the caller bounds memory with it)."""
        return len(self._buf)

    def idle(self) -> bool:
        """True between messages with nothing buffered."""
        return self._state == _HEAD and not self._buf

    def take_buffered(self) -> bytes:
        """Remove and return the unparsed bytes, e.g. to hand what follows a
        CONNECT or an Upgrade to a tunnel. Call it while paused, once
        ``feed``/``resume`` has returned (not from inside a callback)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return data

    # -- internals --------------------------------------------------------

    def _err(self, status: int, reason: str, detail: str = "") -> ParseError:
        return ParseError(self._FORCE_STATUS or status, reason, detail)

    def _process(self, buf: bytes | bytearray) -> None:
        """Parse ``buf`` from 0 and keep what is left unparsed."""
        pos = 0
        n = len(buf)
        copy = type(buf) is not bytes  # body chunks handed out must be bytes
        handler = self._handler
        try:
            while pos < n and not self.paused:
                state = self._state
                if state == _HEAD:
                    scanned = self._scanned
                    if scanned == 0:
                        if self._IS_RESPONSE:
                            if not self._methods:  # ResponseParser's queue of expected responses
                                raise ParseError(
                                    502, "unexpected_response_data", "bytes from upstream with no request outstanding"
                                )
                        elif buf[pos] == 13:  # CR: maybe an empty line before the request line
                            if pos + 1 >= n:
                                break
                            if buf[pos + 1] == 10:
                                self._blank_lines += 1
                                if self._blank_lines > _MAX_BLANK_LINES:
                                    raise self._err(
                                        400, "invalid_request_line", "too many empty lines before the request"
                                    )
                                pos += 2
                                continue
                    # Resume where the last search stopped, less 3 bytes in case
                    # the terminator straddles two feeds.
                    end = buf.find(b"\r\n\r\n", pos + scanned - 3 if scanned > 3 else pos)
                    if end < 0:
                        self._unterminated(buf, pos, n)
                        break
                    self._scanned = 0
                    lines = _split_head(buf, pos, end)
                    # Characters are checked line by line as the head is
                    # parsed; see _check_block for why it runs on any error.
                    try:
                        if end + 4 - pos > self._max_header_bytes:
                            self._too_large(end + 4 - pos)
                        if len(lines) > self._max_headers + 1:
                            self._too_many(len(lines) - 1)
                        self._on_head(lines)
                    except ParseError:
                        _check_block(buf[pos:end], self._FORCE_STATUS or 400, self._FIRST_LINE)
                        raise
                    pos = end + 4
                elif state == _BODY_LENGTH or state == _CHUNK_DATA:
                    remaining = self._remaining
                    if n - pos <= remaining:
                        # All that is left of this buffer is body: no slicing when
                        # the caller's whole object is body.
                        chunk = buf[pos:] if pos else buf
                        self._remaining = remaining - (n - pos)
                        pos = n
                        handler.on_body(bytes(chunk) if copy else chunk)
                        if self._remaining:
                            continue
                    else:
                        end = pos + remaining
                        chunk = buf[pos:end]
                        pos = end
                        self._remaining = 0
                        handler.on_body(bytes(chunk) if copy else chunk)
                    if state == _CHUNK_DATA:
                        self._state = _CHUNK_CRLF
                    else:  # self._complete(), inlined
                        self._state = _HEAD
                        self._blank_lines = 0
                        if handler.on_message_complete():
                            self.paused = True
                elif state == _CHUNK_SIZE:
                    eol = buf.find(b"\r\n", pos, pos + _MAX_CHUNK_LINE + 2)
                    if eol < 0:
                        if n - pos > _MAX_CHUNK_LINE + 1:
                            raise self._err(400, "invalid_chunk_size", "chunk size line too long")
                        # No CRLF yet, so any LF is bare; a CR is fine only last.
                        if buf.find(b"\n", pos, n) >= 0 or buf.find(b"\r", pos, n - 1) >= 0:
                            raise self._err(400, "invalid_chunk_size", "chunk size line not ended by CRLF")
                        break
                    m = _CHUNK_LINE.fullmatch(buf, pos, eol)
                    if m is None:
                        raise self._err(
                            400, "invalid_chunk_size", f"invalid chunk size line {bytes(buf[pos:eol][:40])!r}"
                        )
                    size = int(m.group(1), 16)
                    pos = eol + 2
                    if size:
                        self._state = _CHUNK_DATA
                        self._remaining = size
                    else:
                        self._state = _TRAILERS
                elif state == _CHUNK_CRLF:
                    if buf[pos] != 13 or (pos + 1 < n and buf[pos + 1] != 10):
                        raise self._err(400, "invalid_chunk_data", "chunk data not followed by CRLF")
                    if pos + 1 >= n:
                        break  # keep the CR, wait for the LF
                    pos += 2
                    self._state = _CHUNK_SIZE
                elif state == _TRAILERS:
                    if self._scanned == 0 and buf[pos] == 13:
                        if pos + 1 >= n:
                            break
                        if buf[pos + 1] == 10:  # no trailer section
                            pos += 2
                            self._complete()
                            continue
                    scanned = self._scanned
                    end = buf.find(b"\r\n\r\n", pos + scanned - 3 if scanned > 3 else pos)
                    if end < 0:
                        self._unterminated(buf, pos, n)
                        break
                    self._scanned = 0
                    lines = _split_head(buf, pos, end)
                    try:
                        if end + 4 - pos > self._max_header_bytes:
                            self._too_large(end + 4 - pos)
                        if len(lines) > self._max_headers:
                            self._too_many(len(lines))
                        self._on_trailers(lines)
                    except ParseError:
                        _check_block(buf[pos:end], self._FORCE_STATUS or 400, None)
                        raise
                    pos = end + 4
                    self._complete()
                else:  # _BODY_EOF: everything up to the close is body
                    chunk = buf[pos:] if pos else buf
                    pos = n
                    handler.on_body(bytes(chunk) if copy else chunk)
        except ParseError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        if buf is self._buf:
            if pos:
                del buf[:pos]
        elif pos < len(buf):
            self._buf += memoryview(buf)[pos:]

    def _unterminated(self, buf: bytes | bytearray, start: int, n: int) -> None:
        """Judge the head/trailers begun at ``start`` whose CRLFCRLF has not
        arrived yet: what is already wrong, or already too large, fails now."""
        scanned = self._scanned
        first_line = self._FIRST_LINE if self._state == _HEAD else None
        if (scanned == 0 and buf[start] == 10) or _PARTIAL_BAD.search(
            buf, start + scanned - 1 if scanned else start
        ):
            raise _char_error(buf[start:n].decode("latin-1"), self._FORCE_STATUS or 400, first_line)
        if n - start >= self._max_header_bytes:
            self._too_large(n - start)
        self._scanned = n - start

    def _too_large(self, size: int) -> None:
        what = "headers" if self._state == _HEAD else "trailers"
        raise self._err(431, f"{what}_too_large", f"{what} exceed {self._max_header_bytes} bytes ({size}+)")

    def _too_many(self, fields: int) -> None:
        what = "headers" if self._state == _HEAD else "trailers"
        raise self._err(431, f"too_many_{what}", f"{fields} {what}, limit {self._max_headers}")

    def _on_trailers(self, lines: list[str]) -> None:
        trailers, specials, _ = _read_fields(lines, 0, _FORBIDDEN_TRAILERS, None, None, self._FORCE_STATUS or 400)
        if specials:
            raise self._err(400, "forbidden_trailer", f"{specials[0][0]} in trailers")
        if trailers:
            self._handler.on_trailers(trailers)

    def _complete(self) -> None:
        self._state = _HEAD
        self._blank_lines = 0
        if self._handler.on_message_complete():
            self.paused = True

    def _on_head(self, lines: list[str]) -> None:
        """Parse a head, split into lines and checked for size."""
        raise NotImplementedError

    def _finish_eof(self) -> None:
        raise NotImplementedError


class RequestParser(_Parser):
    """Parses requests from a client; see the module docstring.

    The handler gets ``on_request_head(RequestHead)``, ``on_body(bytes)``
    (chunked framing removed), ``on_trailers(Headers)`` (non-empty chunked
    trailers only) and ``on_message_complete()``; a truthy return from the
    latter pauses the parser right after that message.
    """

    def __init__(
        self,
        handler: RequestHandler,
        *,
        max_header_bytes: int = 60 * 1024,
        max_headers: int = 100,
        drop_hop_by_hop: bool = False,
    ) -> None:
        super().__init__(
            handler, max_header_bytes=max_header_bytes, max_headers=max_headers, drop_hop_by_hop=drop_hop_by_hop
        )

    def _finish_eof(self) -> None:
        if self._eof_done:
            return
        self._eof_done = True
        if self._state != _HEAD or self._buf:
            self._error = ParseError(400, "incomplete_request", "connection closed mid-request")
            raise self._error

    def _on_head(self, lines: list[str]) -> None:
        method, target, version = _request_line(lines[0])
        authority = None
        scheme = "http"
        if target[0] != "/":
            if "://" in target:
                scheme, authority, target = _absolute_form(target, method)
            elif not (method == "CONNECT" or (target == "*" and method == "OPTIONS")):
                raise ParseError(400, "invalid_request_line", f"invalid request-target {target[:80]!r}")

        # Host is left out of the Headers, and the hop-by-hop fields when
        # asked to (in ``hop``).
        headers, specials, hop = _read_fields(
            lines, 1, _REQUEST_SPECIAL, "host", HOP_BY_HOP if self._drop_hop_by_hop else None, 400
        )

        http11 = version == "HTTP/1.1"
        keep_alive = http11
        expect_continue = False
        content_length = None
        chunked = False
        host = None
        if specials:
            lengths = encodings = connection = None
            for name, value in specials:
                if name == "host":
                    if host is not None:
                        raise ParseError(400, "duplicate_host", "more than one Host header")
                    host = value
                elif name == "connection":
                    if connection is None:
                        connection = [value]
                    else:
                        connection.append(value)
                elif name == "content-length":
                    if lengths is None:
                        lengths = [value]
                    else:
                        lengths.append(value)
                elif name == "transfer-encoding":
                    if encodings is None:
                        encodings = [value]
                    else:
                        encodings.append(value)
                elif http11 and value.lower() == "100-continue":  # expect
                    expect_continue = True
            if connection is not None:
                if len(connection) == 1 and "," not in connection[0]:
                    tokens = {connection[0].lower()}
                else:
                    tokens = _connection_tokens(connection)
                if "close" in tokens:
                    keep_alive = False
                elif not http11:
                    keep_alive = "keep-alive" in tokens
            if encodings is not None:
                if lengths is not None:
                    raise ParseError(
                        400, "both_content_length_and_transfer_encoding", "Content-Length with Transfer-Encoding"
                    )
                if not http11:
                    raise ParseError(400, "transfer_encoding_in_http10", "Transfer-Encoding in an HTTP/1.0 request")
                if len(encodings) != 1 or encodings[0].lower() != "chunked":
                    raise ParseError(
                        501, "unsupported_transfer_encoding", f"Transfer-Encoding {', '.join(encodings)[:60]!r}"
                    )
                chunked = True
            elif lengths is not None:
                length = lengths[0]
                # The usual single plain length; isdecimal, not isdigit: see _content_length.
                if len(lengths) == 1 and length.isdecimal() and length.isascii() and len(length) <= 19:
                    content_length = int(length)
                else:
                    content_length, rewrite = _content_length(lengths, 400)
                    if rewrite:
                        _canonical_length(headers, content_length)
        if host is None:
            if http11:
                raise ParseError(400, "missing_host", "HTTP/1.1 request without Host")
            host = ""
        elif host not in _HOST_CACHE:
            if _HOST.fullmatch(host) is None:
                raise ParseError(400, "invalid_host", f"invalid Host {host[:80]!r}")
            if len(_HOST_CACHE) < _CACHE_MAX:
                _HOST_CACHE.add(host)
        if authority is None:
            authority = host
        if method == "CONNECT" and target[0] != "/" and _HOST.fullmatch(target) is None:
            raise ParseError(400, "invalid_request_line", "invalid CONNECT target")
        if hop is not None:
            finish_hop_by_hop(headers, hop)

        head = RequestHead(
            method, target, authority, headers, version, scheme, keep_alive, expect_continue, content_length, chunked
        )
        if chunked:
            self._state = _CHUNK_SIZE
        elif content_length:
            self._state = _BODY_LENGTH
            self._remaining = content_length
        handler = self._handler
        handler.on_request_head(head)
        if not chunked and not content_length:  # self._complete(), inlined
            self._state = _HEAD
            self._blank_lines = 0
            if handler.on_message_complete():
                self.paused = True


def _py_request_line(line: str) -> tuple[str, str, str]:
    """Split and check a request line: (method, request-target, version).
    ``_speedups.request_line`` is this in C for the common case."""
    parts = line.split(" ")
    if len(parts) != 3:
        raise ParseError(400, "invalid_request_line", f"malformed request line {line[:80]!r}")
    method, target, version = parts
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        if _VERSION.fullmatch(version):
            raise ParseError(505, "unsupported_http_version", version)
        raise ParseError(400, "invalid_request_line", f"invalid version {version[:20]!r}")
    if method not in _METHODS and _TOKEN.fullmatch(method) is None:
        raise ParseError(400, "invalid_request_line", f"invalid method {method[:20]!r}")
    # Printable ASCII only: no HTAB, no obs-text (split removed spaces).
    # With the method and version checks, no control character is left
    # anywhere in the request line: it needs no check of its own.
    if not target.isascii() or not target.isprintable() or not target:
        raise ParseError(400, "invalid_request_line", "invalid request-target")
    if "#" in target:
        raise ParseError(400, "invalid_request_line", "fragment in request-target")
    return method, target, version


def _status_line(line: str) -> tuple[str, int, str]:
    """Parse and check a status line missing from ``_STATUS_LINES``, and
    cache it: (version, status, reason)."""
    # status-line = HTTP-version SP status-code SP [ reason-phrase ]; the
    # second SP is often missing in the wild and harmless.
    version, _, rest = line.partition(" ")
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        if _VERSION.fullmatch(version):
            raise ParseError(502, "unsupported_http_version", version)
        raise ParseError(502, "invalid_status_line", f"malformed status line {line[:80]!r}")
    code = rest[:3]
    if (
        len(code) != 3
        or not code.isdecimal()
        or not code.isascii()
        or code[0] == "0"
        or (len(rest) > 3 and rest[3] != " ")
    ):
        raise ParseError(502, "invalid_status_line", f"malformed status line {line[:80]!r}")
    reason = rest[4:]
    if not reason.isprintable() and _VALUE_CTL.search(reason):
        raise ParseError(502, "invalid_status_line", "control character")  # _check_block names it
    parsed = (version, int(code), reason)
    if len(line) <= _CACHED_LINE_MAX:
        if len(_STATUS_LINES) >= _LINE_CACHE_MAX:
            _STATUS_LINES.clear()
        _STATUS_LINES[line] = parsed
    return parsed


def _absolute_form(target: str, method: str) -> tuple[str, str, str]:
    """Split ``scheme://authority/path?query`` (RFC 9112 3.2.2) into
    (scheme, authority, path)."""
    scheme, _, rest = target.partition("://")
    if _SCHEME.fullmatch(scheme) is None:
        raise ParseError(400, "invalid_request_line", "invalid scheme in absolute-form target")
    cut = len(rest)
    for sep in "/?":
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    # Userinfo is an error in http(s) URIs (RFC 9110 4.2.4) and a classic
    # way to make two parsers disagree about the host.
    if not authority or "@" in authority or _HOST.fullmatch(authority) is None:
        raise ParseError(400, "invalid_request_line", "invalid authority in absolute-form target")
    if not path:
        path = "*" if method == "OPTIONS" else "/"
    elif path[0] == "?":
        path = "/" + path
    return scheme.lower(), authority, path


class ResponseParser(_Parser):
    """Parses responses from an upstream; every error is a 502.

    Call :meth:`expect` with each request's method as it is sent: responses
    are matched to requests in order, which decides whether a response has a
    body (HEAD, CONNECT).
    """

    _FORCE_STATUS = 502
    _IS_RESPONSE = True
    _FIRST_LINE = "invalid_status_line"

    def __init__(
        self,
        handler: ResponseHandler,
        *,
        max_header_bytes: int = 60 * 1024,
        max_headers: int = 100,
        drop_hop_by_hop: bool = False,
    ) -> None:
        super().__init__(
            handler, max_header_bytes=max_header_bytes, max_headers=max_headers, drop_hop_by_hop=drop_hop_by_hop
        )
        self._methods: deque[str] = deque()
        self._informational = 0

    def expect(self, method: str) -> None:
        """Record that a request with ``method`` was sent (FIFO)."""
        self._methods.append(method)

    @property
    def outstanding(self) -> int:
        """Requests sent whose final response head has not arrived."""
        return len(self._methods)

    def _finish_eof(self) -> None:
        if self._eof_done:
            return
        self._eof_done = True
        state = self._state
        if state == _BODY_EOF:
            self._state = _HEAD
            self._handler.on_message_complete()
        elif state != _HEAD or self._buf:
            self._error = ParseError(502, "upstream_premature_close", "upstream closed mid-response")
            raise self._error
        elif self._methods:
            self._error = ParseError(502, "upstream_closed_before_response", "upstream closed before responding")
            raise self._error

    def _on_head(self, lines: list[str]) -> None:
        version, status, reason = _STATUS_LINES.get(lines[0]) or _status_line(lines[0])

        headers, specials, hop = _read_fields(
            lines, 1, _RESPONSE_SPECIAL, None, HOP_BY_HOP if self._drop_hop_by_hop else None, 502
        )
        if hop is not None:
            finish_hop_by_hop(headers, hop)
        http11 = version == "HTTP/1.1"
        handler = self._handler

        method = self._methods[0]
        if status < 200 and status != 101:
            self._informational += 1
            if self._informational > _MAX_INFORMATIONAL:
                raise ParseError(502, "too_many_informational", f"more than {_MAX_INFORMATIONAL} 1xx responses")
            handler.on_informational(ResponseHead(status, headers, reason, version, http11))
            return
        self._methods.popleft()
        self._informational = 0

        keep_alive = http11
        lengths: list[str] | None = None
        encodings: list[str] | None = None
        if specials:
            connection = None
            for name, value in specials:
                if name == "connection":
                    if connection is None:
                        connection = [value]
                    else:
                        connection.append(value)
                elif name == "content-length":
                    if lengths is None:
                        lengths = [value]
                    else:
                        lengths.append(value)
                elif encodings is None:  # transfer-encoding
                    encodings = [value]
                else:
                    encodings.append(value)
            if connection is not None:
                if len(connection) == 1 and "," not in connection[0]:
                    tokens = {connection[0].lower()}
                else:
                    tokens = _connection_tokens(connection)
                if "close" in tokens:
                    keep_alive = False
                elif not http11:
                    keep_alive = "keep-alive" in tokens

        if status == 101 or (method == "CONNECT" and 200 <= status < 300):
            # A tunnel: what follows is the other protocol, up to the close.
            # Content-Length/Transfer-Encoding mean nothing here (RFC 9110 9.3.6).
            self._state = _BODY_EOF
            handler.on_response_head(ResponseHead(status, headers, reason, version, False))
            return

        content_length = None
        chunked = False
        if encodings is not None:
            if lengths is not None:
                raise ParseError(
                    502, "both_content_length_and_transfer_encoding", "Content-Length with Transfer-Encoding"
                )
            if not http11:
                raise ParseError(502, "transfer_encoding_in_http10", "Transfer-Encoding in an HTTP/1.0 response")
            if len(encodings) != 1 or encodings[0].lower() != "chunked":
                raise ParseError(
                    502, "unsupported_transfer_encoding", f"Transfer-Encoding {', '.join(encodings)[:60]!r}"
                )
            chunked = True
        elif lengths is not None:
            length = lengths[0]
            # The usual single plain length; isdecimal, not isdigit: see _content_length.
            if len(lengths) == 1 and length.isdecimal() and length.isascii() and len(length) <= 19:
                content_length = int(length)
            else:
                content_length, rewrite = _content_length(lengths, 502)
                if rewrite:
                    _canonical_length(headers, content_length)

        if method == "HEAD" or status == 204 or status == 304:
            # No body whatever the framing headers say (RFC 9112 6.3); a HEAD
            # response's Content-Length describes the GET it stands for.
            complete = True
        elif chunked:
            self._state = _CHUNK_SIZE
            complete = False
        elif content_length is not None:
            complete = not content_length
            if content_length:
                self._state = _BODY_LENGTH
                self._remaining = content_length
        else:
            keep_alive = False  # delimited by the close
            self._state = _BODY_EOF
            complete = False
        handler.on_response_head(
            ResponseHead(status, headers, reason, version, keep_alive, content_length, chunked)
        )
        if complete:
            self._complete()


# --------------------------------------------------------------------------
# Serialisers

LAST_CHUNK = b"0\r\n\r\n"

_REASONS = {status.value: status.phrase for status in HTTPStatus}


def _check_out_name(name: str) -> None:
    if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
        raise ValueError(f"invalid header name {name!r}")
    if len(_OUT_NAMES) < _CACHE_MAX:
        _OUT_NAMES.add(name)


def _finish(lines: list[str]) -> bytes:
    """Join a head's lines with CRLFs and end it, refusing any line that
    holds a CR, LF or NUL of its own (it would split or cut the message).

    The check runs on the lines joined without separators: ``in`` finds a
    character with memchr, where counting CRs and LFs in the finished text
    walked it character by character (a tenth of a serialisation's cost).
    """
    flat = "".join(lines)
    if "\r" in flat or "\n" in flat or "\x00" in flat:
        raise ValueError("CR, LF or NUL in a header name or value, method, path or reason")
    lines.append("")  # the empty line that ends the head
    lines.append("")
    return "\r\n".join(lines).encode("latin-1")  # UnicodeEncodeError is a ValueError


# No cache of encoded field lines here, unlike the parser's: a (name, value)
# key also matches a str subclass with equal content, which an f-string may
# write differently (a (str, Enum) member writes as "Cls.NAME"), and checking
# exact types per field costs about what the cache saves.
def _append_fields(lines: list[str], headers: Headers) -> None:
    append = lines.append
    known = _OUT_NAMES
    for name, value in headers:
        if name not in known:
            _check_out_name(name)
        append(f"{name}: {value}")


def serialize_request_head(head: RequestHead) -> bytes:
    """``METHOD path HTTP/1.1``, ``host``, then ``head.headers`` exactly as
    they are (the caller owns the framing headers). Raises ValueError on
    anything that could split or reshape the message."""
    method = head.method
    path = head.path
    if method not in _METHODS and _TOKEN.fullmatch(method) is None:
        raise ValueError(f"invalid method {method!r}")
    if not path or " " in path or "\t" in path:
        raise ValueError(f"invalid request path {path!r}")
    lines = [f"{method} {path} HTTP/1.1", f"host: {head.authority}"]
    _append_fields(lines, head.headers)
    return _finish(lines)


def serialize_response_head(head: ResponseHead) -> bytes:
    """``HTTP/1.1 status reason`` then ``head.headers`` exactly as they are;
    the reason defaults to the standard phrase."""
    status = head.status
    if type(status) is not int or not 100 <= status <= 999:
        raise ValueError(f"invalid status {status!r}")
    reason = head.reason or _REASONS.get(status, "")
    lines = [f"HTTP/1.1 {status} {reason}"]
    _append_fields(lines, head.headers)
    return _finish(lines)


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; ``b""`` for empty data (an empty chunk
    would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_trailers(trailers: Headers) -> bytes:
    """The last chunk followed by ``trailers`` and the final CRLF."""
    if not trailers:
        return LAST_CHUNK
    lines = ["0"]
    _append_fields(lines, trailers)
    return _finish(lines)


# --------------------------------------------------------------------------
# The C accelerator (_speedups.c), unless it was not built or
# OUTRIDER_NO_SPEEDUPS is set. Its serialisers hand anything uncommon, errors
# included, back to the Python ones (kept as py_* for that and for the
# differential tests); its read_fields is _py_read_fields, calling
# _new_field for lines missing from the caches; its split_head is
# _py_split_head; its request_line hands any line it does not accept to
# _py_request_line.

py_serialize_request_head = serialize_request_head
py_serialize_response_head = serialize_response_head
_read_fields = _py_read_fields
_split_head = _py_split_head
_request_line = _py_request_line
SPEEDUPS = False


def speedups_config() -> dict:
    """What ``_speedups.configure`` is given: this module's caches, and its
    Python functions that the C code calls."""
    return {
        "request_fallback": py_serialize_request_head,
        "response_fallback": py_serialize_response_head,
        "out_names": _OUT_NAMES,
        "reasons": _REASONS,
        "name_cache_max": _CACHE_MAX,
        "field_cache": _FIELD_CACHE,
        "special_cache": _SPECIAL_CACHE,
        "new_field": _new_field,
        "headers_type": Headers,
        "request_line_fallback": _py_request_line,
    }


def _load_speedups():
    """The configured C module, or None."""
    if os.environ.get("OUTRIDER_NO_SPEEDUPS"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    _speedups.configure(**speedups_config())
    return _speedups


_speedups = _load_speedups()
if _speedups is not None:
    serialize_request_head = _speedups.serialize_request_head  # noqa: F811
    serialize_response_head = _speedups.serialize_response_head  # noqa: F811
    _read_fields = _speedups.read_fields
    _split_head = _speedups.split_head
    _request_line = _speedups.request_line
    SPEEDUPS = True
