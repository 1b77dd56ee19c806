"""Unit tests of the sans-I/O HTTP/1.1 parsers and serialisers."""

from __future__ import annotations

import pytest

from outrider.extensions.codecs.http1.parser import (
    LAST_CHUNK,
    ParseError,
    RequestParser,
    ResponseParser,
    encode_chunk,
    encode_trailers,
    serialize_request_head,
    serialize_response_head,
)
from outrider.http.message import Headers, RequestHead, ResponseHead


class Recorder:
    """A handler that records every callback as an event tuple."""

    def __init__(self, pause: bool = False) -> None:
        self.events: list[tuple] = []
        self.pause = pause

    def on_request_head(self, head: RequestHead) -> None:
        self.events.append(("head", head))

    def on_response_head(self, head: ResponseHead) -> None:
        self.events.append(("head", head))

    def on_informational(self, head: ResponseHead) -> None:
        self.events.append(("info", head))

    def on_body(self, data: bytes) -> None:
        assert type(data) is bytes and data
        self.events.append(("body", data))

    def on_trailers(self, trailers: Headers) -> None:
        self.events.append(("trailers", trailers))

    def on_message_complete(self) -> bool:
        self.events.append(("complete",))
        return self.pause

    # -- views -------------------------------------------------------------

    def heads(self) -> list:
        return [e[1] for e in self.events if e[0] == "head"]

    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "body")

    def normalised(self) -> list:
        """Events with adjacent body chunks merged and heads made comparable,
        so that different feed splits can be compared."""
        out: list = []
        for event in self.events:
            if event[0] == "body" and out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + event[1])
            elif event[0] in ("head", "info"):
                out.append((event[0], describe(event[1])))
            elif event[0] == "trailers":
                out.append(("trailers", list(event[1])))
            else:
                out.append(event)
        return out


def describe(head) -> dict:
    return {name: getattr(head, name) for name in head.__slots__ if name != "headers"} | {
        "headers": list(head.headers)
    }


def parse_request(data: bytes, **kwargs) -> Recorder:
    rec = Recorder()
    RequestParser(rec, **kwargs).feed(data)
    return rec


def request_error(data: bytes, **kwargs) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse_request(data, **kwargs)
    return info.value


def feed_in_pieces(parser_factory, data: bytes, cuts: list[int]) -> Recorder:
    rec = Recorder()
    parser = parser_factory(rec)
    last = 0
    for cut in [*cuts, len(data)]:
        parser.feed(data[last:cut])
        last = cut
    return rec


GET = (
    b"GET /api/v1/users?id=123 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent: test/1.0\r\n"
    b"Accept: */*\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"X-Trace:   a b\t \r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)

CHUNKED_POST = (
    b"POST /upload HTTP/1.1\r\n"
    b"Host: h\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"5;name=value;q=\"a \\\" b\"\r\n"
    b"hello\r\n"
    b"b ; x\r\n"
    b", world!!!!\r\n"
    b"0\r\n"
    b"Checksum: abc\r\n"
    b"X-Other: 1\r\n"
    b"\r\n"
)


# --------------------------------------------------------------------------
# Requests: the basics


def test_simple_get_fields():
    rec = Recorder()
    parser = RequestParser(rec)
    parser.feed(GET)
    assert [e[0] for e in rec.events] == ["head", "complete"]
    head = rec.events[0][1]
    assert head.method == "GET"
    assert head.path == "/api/v1/users?id=123"
    assert head.authority == "example.com"
    assert head.version == "HTTP/1.1"
    assert head.scheme == "http"
    # Host is carried as authority, not in headers; names lower-case, values
    # trimmed of surrounding OWS only.
    assert list(head.headers) == [
        ("user-agent", "test/1.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, deflate"),
        ("x-trace", "a b"),
        ("connection", "keep-alive"),
    ]
    assert head.keep_alive is True
    assert head.expect_continue is False
    assert head.content_length is None
    assert head.chunked is False
    assert parser.idle()
    assert parser.buffered == 0


def test_obs_text_round_trips_as_latin1_and_nbsp_is_not_trimmed():
    rec = parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Name: caf\xe9\xa0\r\n\r\n")
    assert rec.heads()[0].headers.get("x-name") == "caf\xe9\xa0"


@pytest.mark.parametrize(
    "version, connection, expected",
    [
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", ["close"], False),
        ("HTTP/1.1", ["Keep-Alive, CLOSE"], False),
        ("HTTP/1.1", ["upgrade", "close"], False),
        ("HTTP/1.1", ["keep-alive"], True),
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", ["Keep-Alive"], True),
        ("HTTP/1.0", ["te, keep-alive"], True),
        ("HTTP/1.0", ["keep-alive", "close"], False),
        ("HTTP/1.0", ["upgrade"], False),
    ],
)
def test_keep_alive_rules(version, connection, expected):
    lines = [f"GET / {version}", "Host: h"] + [f"Connection: {c}" for c in connection or ()]
    rec = parse_request(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert rec.heads()[0].keep_alive is expected


def test_http10_without_host_is_accepted():
    head = parse_request(b"GET / HTTP/1.0\r\n\r\n").heads()[0]
    assert head.version == "HTTP/1.0"
    assert head.authority == ""


@pytest.mark.parametrize(
    "version, value, expected",
    [
        ("HTTP/1.1", "100-continue", True),
        ("HTTP/1.1", "100-Continue", True),
        ("HTTP/1.1", "something-else", False),
        ("HTTP/1.0", "100-continue", False),
    ],
)
def test_expect_continue(version, value, expected):
    data = f"POST / {version}\r\nHost: h\r\nExpect: {value}\r\nContent-Length: 3\r\n\r\n".encode()
    rec = parse_request(data)
    assert rec.heads()[0].expect_continue is expected
    assert [e[0] for e in rec.events] == ["head"]  # still waiting for the body


@pytest.mark.parametrize(
    "target, authority, path, scheme",
    [
        ("http://example.com:8080/a/b?c=d", "example.com:8080", "/a/b?c=d", "http"),
        ("http://example.com", "example.com", "/", "http"),
        ("http://example.com?x=1", "example.com", "/?x=1", "http"),
        ("HTTPS://Example.com/", "Example.com", "/", "https"),
        ("http://[::1]:80/p", "[::1]:80", "/p", "http"),
    ],
)
def test_absolute_form_target(target, authority, path, scheme):
    data = f"GET {target} HTTP/1.1\r\nHost: ignored.example\r\n\r\n".encode()
    head = parse_request(data).heads()[0]
    assert (head.authority, head.path, head.scheme) == (authority, path, scheme)


def test_absolute_form_options_without_path_becomes_asterisk():
    head = parse_request(b"OPTIONS http://h:81 HTTP/1.1\r\nHost: h:81\r\n\r\n").heads()[0]
    assert head.path == "*"


def test_connect_and_asterisk_targets():
    head = parse_request(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").heads()[0]
    assert (head.method, head.path, head.authority) == ("CONNECT", "example.com:443", "example.com:443")
    head = parse_request(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").heads()[0]
    assert head.path == "*"


def test_leading_empty_lines_are_ignored_even_split():
    data = b"\r\n\r\n" + GET
    whole = parse_request(data)
    assert whole.heads()[0].path == "/api/v1/users?id=123"
    split = feed_in_pieces(RequestParser, data, [1, 2, 3])
    assert split.normalised() == whole.normalised()


def test_too_many_leading_empty_lines():
    err = request_error(b"\r\n" * 9 + GET)
    assert (err.status, err.reason) == (400, "invalid_request_line")
    assert parse_request(b"\r\n" * 8 + GET).heads()


# --------------------------------------------------------------------------
# Bodies


def test_content_length_body_split_across_feeds_is_streamed():
    rec = Recorder()
    parser = RequestParser(rec)
    parser.feed(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123")
    assert rec.heads()[0].content_length == 10
    assert rec.events[-1] == ("body", b"0123")  # handed on at once, not buffered
    assert parser.buffered == 0
    chunk = b"4567"
    parser.feed(chunk)
    # All of a fed object that is body is passed on as that same object.
    assert rec.events[-1][1] is chunk
    parser.feed(b"89GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert rec.body() == b"0123456789"
    assert [e[0] for e in rec.events] == ["head", "body", "body", "body", "complete", "head", "complete"]


def test_content_length_zero_completes_immediately():
    rec = parse_request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    assert rec.heads()[0].content_length == 0
    assert [e[0] for e in rec.events] == ["head", "complete"]


def test_identical_content_lengths_collapse_to_one():
    rec = parse_request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX: y\r\nContent-Length: 3, 3\r\n\r\nabc")
    head = rec.heads()[0]
    assert head.content_length == 3
    assert head.headers.get_all("content-length") == ["3"]
    assert list(head.headers) == [("content-length", "3"), ("x", "y")]
    assert rec.body() == b"abc"


def test_chunked_body_with_extensions_and_trailers():
    rec = parse_request(CHUNKED_POST)
    head = rec.heads()[0]
    assert head.chunked is True and head.content_length is None
    assert head.headers.get("transfer-encoding") == "chunked"
    assert rec.body() == b"hello, world!!!!"
    assert rec.normalised()[-2:] == [("trailers", [("checksum", "abc"), ("x-other", "1")]), ("complete",)]


def test_chunked_body_without_trailers_has_no_trailer_event():
    rec = parse_request(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert [e[0] for e in rec.events] == ["head", "body", "complete"]
    assert rec.body() == b"abc"


def test_chunk_data_streams_before_the_chunk_is_complete():
    rec = Recorder()
    parser = RequestParser(rec)
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n01234")
    assert rec.body() == b"01234"
    parser.feed(b"56789\r\n0\r\n\r\n")
    assert rec.body() == b"0123456789"
    assert rec.events[-1] == ("complete",)


@pytest.mark.parametrize("data", [GET, CHUNKED_POST, b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nabcde" + GET])
def test_every_split_point_gives_the_same_result(data):
    whole = parse_request(data).normalised()
    assert whole[-1] == ("complete",)
    for cut in range(1, len(data)):
        assert feed_in_pieces(RequestParser, data, [cut]).normalised() == whole, cut
    assert feed_in_pieces(RequestParser, data, list(range(1, len(data)))).normalised() == whole


def test_handler_can_pause_mid_body_and_resume():
    class Pausing(Recorder):
        parser: RequestParser

        def on_body(self, data: bytes) -> None:
            super().on_body(data)
            self.parser.paused = True

    rec = Pausing()
    parser = rec.parser = RequestParser(rec)
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")
    assert rec.body() == b"ab"
    assert parser.buffered > 0
    parser.resume()
    assert rec.body() == b"abcd"
    parser.resume()
    assert rec.events[-1] == ("complete",)
    assert parser.idle()


# --------------------------------------------------------------------------
# Pipelining, pause/resume, EOF


def test_pipelined_requests_pause_after_each_message():
    rec = Recorder(pause=True)
    parser = RequestParser(rec)
    second = b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
    third = b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n"
    parser.feed(GET + second + third)
    assert [h.path for h in rec.heads()] == ["/api/v1/users?id=123"]
    assert parser.paused
    assert parser.buffered == len(second) + len(third)
    assert not parser.idle()
    parser.feed(b"GET /4 HTTP/1.1\r\n")  # kept, not parsed, while paused
    assert len(rec.heads()) == 1
    parser.resume()
    assert [h.path for h in rec.heads()] == ["/api/v1/users?id=123", "/2"]
    assert rec.body() == b"hi"
    parser.resume()
    assert [h.path for h in rec.heads()][-1] == "/3"
    parser.resume()
    assert len(rec.heads()) == 3  # /4 is incomplete
    parser.feed(b"Host: h\r\n\r\n")
    assert rec.heads()[-1].path == "/4"


def test_take_buffered_hands_over_unparsed_bytes():
    rec = Recorder(pause=True)
    parser = RequestParser(rec)
    parser.feed(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01tls")
    assert parser.take_buffered() == b"\x16\x03\x01tls"
    assert parser.buffered == 0


def test_feed_eof_between_messages_is_clean():
    parser = RequestParser(Recorder())
    parser.feed(GET)
    parser.feed_eof()
    assert parser.idle()


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: h\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
    ],
)
def test_feed_eof_mid_request(data):
    parser = RequestParser(Recorder())
    parser.feed(data)
    with pytest.raises(ParseError) as info:
        parser.feed_eof()
    assert (info.value.status, info.value.reason) == (400, "incomplete_request")


def test_feed_eof_while_paused_is_judged_on_resume():
    rec = Recorder(pause=True)
    parser = RequestParser(rec)
    parser.feed(GET + b"GET /half HTTP/1.1\r\n")
    parser.feed_eof()  # nothing judged yet: the rest is held
    with pytest.raises(ParseError) as info:
        parser.resume()
    assert info.value.reason == "incomplete_request"

    rec = Recorder(pause=True)
    parser = RequestParser(rec)
    parser.feed(GET + GET)
    parser.feed_eof()
    parser.resume()  # the second request is whole: no error
    assert len(rec.heads()) == 2


# --------------------------------------------------------------------------
# Malformed requests and smuggling shapes


def req(*header_lines: str, start: str = "GET / HTTP/1.1", body: bytes = b"") -> bytes:
    return ("\r\n".join([start, *header_lines]) + "\r\n\r\n").encode("latin-1") + body


SMUGGLING = [
    # framing
    (req("Host: h", "Content-Length: 5", "Transfer-Encoding: chunked"), 400, "both_content_length_and_transfer_encoding"),
    (req("Host: h", "Transfer-Encoding: chunked", "Content-Length: 5"), 400, "both_content_length_and_transfer_encoding"),
    (req("Host: h", "Content-Length: 5", "Content-Length: 6"), 400, "duplicate_content_length"),
    (req("Host: h", "Content-Length: 5, 6"), 400, "duplicate_content_length"),
    (req("Host: h", "Content-Length: +5"), 400, "invalid_content_length"),
    (req("Host: h", "Content-Length: -1"), 400, "invalid_content_length"),
    (req("Host: h", "Content-Length: 0x5"), 400, "invalid_content_length"),
    (req("Host: h", "Content-Length: 5 5"), 400, "invalid_content_length"),
    (req("Host: h", "Content-Length: "), 400, "invalid_content_length"),
    (req("Host: h", "Content-Length: 5,"), 400, "invalid_content_length"),
    (req("Host: h", "Content-Length: \xb2"), 400, "invalid_content_length"),
    (req("Host: h", "Content-Length: 1_0"), 400, "invalid_content_length"),
    (req("Host: h", "Content-Length: " + "9" * 20), 400, "invalid_content_length"),
    (req("Host: h", "Transfer-Encoding: gzip, chunked"), 501, "unsupported_transfer_encoding"),
    (req("Host: h", "Transfer-Encoding: chunked, chunked"), 501, "unsupported_transfer_encoding"),
    (req("Host: h", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), 501, "unsupported_transfer_encoding"),
    (req("Host: h", "Transfer-Encoding: xchunked"), 501, "unsupported_transfer_encoding"),
    (req("Host: h", "Transfer-Encoding: chunked;x"), 501, "unsupported_transfer_encoding"),
    (req("Host: h", "Transfer-Encoding: identity"), 501, "unsupported_transfer_encoding"),
    (req("Transfer-Encoding: chunked", start="POST / HTTP/1.0"), 400, "transfer_encoding_in_http10"),
    # line endings
    (b"GET / HTTP/1.1\nHost: h\r\n\r\n", 400, "bare_cr_or_lf"),
    (b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", 400, "bare_cr_or_lf"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400, "bare_cr_or_lf"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\r\n\r\n", 400, "bare_cr_or_lf"),
    (b"GET / HTTP/1.1\r\nHost: h\n\n", 400, "bare_cr_or_lf"),
    (b"GET / HTTP/1.1\rHost: h\r\n\r\n", 400, "bare_cr_or_lf"),
    (b"\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bare_cr_or_lf"),
    # header names and values
    (req("Host: h", "X-Foo : bar"), 400, "invalid_header_name"),
    (req("Host: h", "X-Foo\t: bar"), 400, "invalid_header_name"),
    (req("Host : h"), 400, "invalid_header_name"),
    (req("Host: h", ": bar"), 400, "invalid_header_name"),
    (req("Host: h", "no colon here"), 400, "invalid_header_name"),
    (req("Host: h", "host"), 400, "invalid_header_name"),  # a cached name, but no colon
    (req("Host: h", "X@Y: z"), 400, "invalid_header_name"),
    (req("Host: h", "X-Foo: a\x00b"), 400, "invalid_header_value"),
    (req("Host: h", "X-Foo: a\x7fb"), 400, "invalid_header_value"),
    (req("Host: h", "X-Foo: a\x01b"), 400, "invalid_header_value"),
    (req("Host: h", "X\x01Foo: ab"), 400, "invalid_header_name"),
    (req("Host: h", "X-Foo: a", " folded"), 400, "obs_fold"),
    (req("Host: h", "X-Foo: a", "\tfolded: x"), 400, "obs_fold"),
    (req(" Host: h"), 400, "obs_fold"),
    # request line
    (req("Host: h", start="GET  / HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET / HTTP/1.1 "), 400, "invalid_request_line"),
    (req("Host: h", start=" GET / HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET\t/ HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET /a\tb HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET /caf\xe9 HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET /a#frag HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET\x00 / HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="G(T / HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET foo HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET / http/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET / HTTP/1.1x"), 400, "invalid_request_line"),
    (req("Host: h", start="GET /"), 400, "invalid_request_line"),
    (req("Host: h", start="GET http://user@h/ HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET http:/// HTTP/1.1"), 400, "invalid_request_line"),
    (req("Host: h", start="GET / HTTP/2.0"), 505, "unsupported_http_version"),
    (req("Host: h", start="GET / HTTP/1.2"), 505, "unsupported_http_version"),
    (req("Host: h", start="GET / HTTP/0.9"), 505, "unsupported_http_version"),
    # Host
    (req("X: y"), 400, "missing_host"),
    (req("Host: a", "Host: b"), 400, "duplicate_host"),
    (req("Host: a", "Host: a"), 400, "duplicate_host"),
    (req("Host: a b"), 400, "invalid_host"),
    (req("Host: a/b"), 400, "invalid_host"),
    (req("Host: u@a"), 400, "invalid_host"),
    # chunked framing
    (req("Host: h", "Transfer-Encoding: chunked", body=b" 5\r\nhello\r\n0\r\n\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"0x5\r\nhello\r\n0\r\n\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"-5\r\nhello\r\n0\r\n\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"+5\r\nhello\r\n0\r\n\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"5 \r\nhello\r\n0\r\n\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"g\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b";x\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"5;\r\nhello\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"5;a b\r\nhello\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"1" * 17 + b"\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"5\nhello\r\n0\r\n\r\n"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"5\rhello"), 400, "invalid_chunk_size"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"5\r\nhelloX\r\n0\r\n\r\n"), 400, "invalid_chunk_data"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"5\r\nhello\n0\r\n\r\n"), 400, "invalid_chunk_data"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"5\r\nhello\rX"), 400, "invalid_chunk_data"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"5;x=" + b"a" * 5000 + b"\r\n"), 400, "invalid_chunk_size"),
    # trailers
    (req("Host: h", "Transfer-Encoding: chunked", body=b"0\r\nContent-Length: 5\r\n\r\n"), 400, "forbidden_trailer"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400, "forbidden_trailer"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"0\r\nX : y\r\n\r\n"), 400, "invalid_header_name"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"0\r\nX: y\n\r\n"), 400, "bare_cr_or_lf"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"0\r\n\n"), 400, "bare_cr_or_lf"),
    (req("Host: h", "Transfer-Encoding: chunked", body=b"0\r\nX: y\r\n z\r\n\r\n"), 400, "obs_fold"),
]


@pytest.mark.parametrize("data, status, reason", SMUGGLING)
def test_malformed_requests(data, status, reason):
    err = request_error(data)
    assert (err.status, err.reason) == (status, reason), err


@pytest.mark.parametrize("data, status, reason", SMUGGLING)
def test_malformed_requests_fed_byte_by_byte(data, status, reason):
    with pytest.raises(ParseError) as info:
        feed_in_pieces(RequestParser, data, list(range(1, len(data))))
    assert (info.value.status, info.value.reason) == (status, reason)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\nHost: h",  # LF-only client: no CRLFCRLF will ever come
        b"GET / HTTP/1.1\r\nHost: h\n\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00",
    ],
)
def test_bad_characters_are_refused_before_the_head_ends(data):
    err = request_error(data)
    assert err.status == 400


def test_valid_odd_requests_are_accepted():
    rec = parse_request(
        req("Host: h", "X-Tab: a\tb", "X-Empty:", "x-colon: a:b", "Content-Length: 007", start="PATCH /a//b?c HTTP/1.1")
        + b"1234567"
    )
    head = rec.heads()[0]
    assert head.method == "PATCH" and head.path == "/a//b?c"
    assert head.headers.get("x-tab") == "a\tb"
    assert head.headers.get("x-empty") == ""
    assert head.headers.get("x-colon") == "a:b"
    assert head.content_length == 7
    assert rec.body() == b"1234567"


def test_extension_method_is_a_token():
    assert parse_request(req("Host: h", start="PROPFIND /x HTTP/1.1")).heads()[0].method == "PROPFIND"


def test_error_is_sticky():
    parser = RequestParser(Recorder())
    with pytest.raises(ParseError) as first:
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    with pytest.raises(ParseError) as again:
        parser.feed(GET)
    assert again.value is first.value
    with pytest.raises(ParseError) as at_eof:
        parser.feed_eof()
    assert at_eof.value is first.value


# --------------------------------------------------------------------------
# Limits


def test_head_too_large_is_refused_before_its_end_arrives():
    parser = RequestParser(Recorder(), max_header_bytes=100)
    first = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 71
    assert len(first) == 99
    parser.feed(first)  # 99 bytes: could still fit
    with pytest.raises(ParseError) as info:
        parser.feed(b"a")  # 100 bytes and no terminator: the head can only be larger
    assert (info.value.status, info.value.reason) == (431, "headers_too_large")


def test_head_size_limit_is_exact():
    head = req("Host: h", "X: " + "a" * 50)
    assert parse_request(head, max_header_bytes=len(head)).heads()
    err = request_error(head, max_header_bytes=len(head) - 1)
    assert (err.status, err.reason) == (431, "headers_too_large")
    # The same, fed one byte at a time.
    with pytest.raises(ParseError) as info:
        feed_in_pieces(lambda h: RequestParser(h, max_header_bytes=len(head) - 1), head, list(range(1, len(head))))
    assert info.value.reason == "headers_too_large"
    assert feed_in_pieces(
        lambda h: RequestParser(h, max_header_bytes=len(head)), head, list(range(1, len(head)))
    ).heads()


def test_default_head_limit_is_60k():
    err = request_error(req("Host: h", "X: " + "a" * (61 * 1024)))
    assert (err.status, err.reason) == (431, "headers_too_large")
    assert parse_request(req("Host: h", "X: " + "a" * (59 * 1024))).heads()


def test_too_many_headers():
    lines = ["Host: h"] + [f"X-{i}: v" for i in range(99)]
    assert len(parse_request(req(*lines)).heads()[0].headers) == 99  # 100 fields incl. Host
    err = request_error(req(*lines, "X-last: v"))
    assert (err.status, err.reason) == (431, "too_many_headers")
    err = request_error(req("Host: h", "A: 1", "B: 2"), max_headers=2)
    assert err.reason == "too_many_headers"


def test_trailer_limits():
    big = req("Host: h", "Transfer-Encoding: chunked", body=b"0\r\nX: " + b"a" * 200 + b"\r\n\r\n")
    err = request_error(big, max_header_bytes=150)
    assert (err.status, err.reason) == (431, "trailers_too_large")
    many = req("Host: h", "Transfer-Encoding: chunked", body=b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    err = request_error(many, max_headers=2)
    assert (err.status, err.reason) == (431, "too_many_trailers")


# --------------------------------------------------------------------------
# Responses


def parse_response(data: bytes, *methods: str, eof: bool = False, **kwargs) -> Recorder:
    rec = Recorder()
    parser = ResponseParser(rec, **kwargs)
    for method in methods or ("GET",):
        parser.expect(method)
    parser.feed(data)
    if eof:
        parser.feed_eof()
    return rec


def response_error(data: bytes, *methods: str, eof: bool = False, **kwargs) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse_response(data, *methods, eof=eof, **kwargs)
    return info.value


RESP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def test_content_length_response():
    rec = parse_response(RESP)
    head = rec.heads()[0]
    assert (head.status, head.reason, head.version) == (200, "OK", "HTTP/1.1")
    assert list(head.headers) == [("content-type", "text/plain"), ("content-length", "5")]
    assert head.content_length == 5 and head.chunked is False and head.keep_alive is True
    assert rec.body() == b"hello"
    assert rec.events[-1] == ("complete",)


def test_chunked_response_with_trailers():
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n"
    rec = parse_response(data)
    assert rec.heads()[0].chunked is True
    assert rec.body() == b"abc"
    assert rec.normalised()[-2:] == [("trailers", [("grpc-status", "0")]), ("complete",)]


def test_read_until_close_response():
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.expect("GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
    parser.feed(b" more")
    head = rec.heads()[0]
    assert head.keep_alive is False
    assert head.content_length is None and not head.chunked
    assert ("complete",) not in rec.events
    parser.feed_eof()
    assert rec.body() == b"some more"
    assert rec.events[-1] == ("complete",)


@pytest.mark.parametrize(
    "data",
    [
        RESP[:-2],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Len",
    ],
)
def test_premature_close(data):
    err = response_error(data, eof=True)
    assert (err.status, err.reason) == (502, "upstream_premature_close")


def test_close_before_any_response_byte():
    err = response_error(b"", eof=True)
    assert (err.status, err.reason) == (502, "upstream_closed_before_response")
    parser = ResponseParser(Recorder())
    parser.feed_eof()  # no request outstanding: an idle close is fine
    assert parser.idle()


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status):
    data = f"HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n".encode() + RESP
    rec = parse_response(data, "GET", "GET")
    assert [h.status for h in rec.heads()] == [status, 200]
    assert rec.body() == b"hello"


def test_head_response_has_no_body_and_fifo_matters():
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + RESP
    rec = parse_response(data, "HEAD", "GET")
    heads = rec.heads()
    assert [h.content_length for h in heads] == [5, 5]
    assert [e[0] for e in rec.events] == ["head", "complete", "head", "body", "complete"]
    assert rec.body() == b"hello"
    # In the other order the first response's body is read as a body.
    rec = parse_response(RESP + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "GET", "HEAD")
    assert [e[0] for e in rec.events] == ["head", "body", "complete", "head", "complete"]


def test_informational_responses_precede_the_final_one():
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + RESP
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.expect("POST")
    parser.feed(data)
    assert [e[0] for e in rec.events] == ["info", "info", "head", "body", "complete"]
    assert rec.events[1][1].headers.get("link") == "</a>"
    assert parser.outstanding == 0


def test_too_many_informational():
    err = response_error(b"HTTP/1.1 100 Continue\r\n\r\n" * 17)
    assert (err.status, err.reason) == (502, "too_many_informational")


def test_switching_protocols_is_a_tunnel():
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.expect("GET")
    parser.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\n\x81\x05hello")
    head = rec.heads()[0]
    assert head.status == 101 and head.keep_alive is False
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\n")  # not a response any more: bytes of the new protocol
    assert rec.body() == b"\x81\x05helloHTTP/1.1 200 OK\r\n\r\n"
    parser.feed_eof()
    assert rec.events[-1] == ("complete",)


def test_connect_2xx_is_a_tunnel_and_ignores_framing():
    rec = parse_response(b"HTTP/1.1 200 Connection Established\r\nContent-Length: 0\r\n\r\n\x16\x03", "CONNECT")
    assert rec.body() == b"\x16\x03"
    assert ("complete",) not in rec.events
    rec = parse_response(b"HTTP/1.1 407 Auth\r\nContent-Length: 2\r\n\r\nno", "CONNECT")
    assert rec.events[-1] == ("complete",) and rec.body() == b"no"


def test_unexpected_response_data():
    err = response_error(RESP, "HEAD")  # "hello" arrives after the HEAD response
    assert (err.status, err.reason) == (502, "unexpected_response_data")
    parser = ResponseParser(Recorder())
    with pytest.raises(ParseError) as info:
        parser.feed(b"H")
    assert info.value.reason == "unexpected_response_data"


def test_response_pause_keeps_next_response_until_resume():
    rec = Recorder(pause=True)
    parser = ResponseParser(rec)
    parser.expect("GET")
    parser.feed(RESP + RESP)
    assert len(rec.heads()) == 1 and parser.buffered == len(RESP)
    with pytest.raises(ParseError) as info:
        parser.resume()  # no second request was sent
    assert info.value.reason == "unexpected_response_data"


@pytest.mark.parametrize(
    "version, connection, framing, keep_alive",
    [
        ("HTTP/1.1", None, "Content-Length: 0", True),
        ("HTTP/1.1", "close", "Content-Length: 0", False),
        ("HTTP/1.0", None, "Content-Length: 0", False),
        ("HTTP/1.0", "keep-alive", "Content-Length: 0", True),
        ("HTTP/1.1", None, None, False),  # read until close
    ],
)
def test_response_keep_alive(version, connection, framing, keep_alive):
    lines = [f"{version} 200 OK"] + ([f"Connection: {connection}"] if connection else []) + ([framing] if framing else [])
    rec = parse_response(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert rec.heads()[0].keep_alive is keep_alive


def test_status_line_without_reason():
    head = parse_response(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n").heads()[0]
    assert (head.status, head.reason) == (200, "")
    head = parse_response(b"HTTP/1.1 599 \r\nContent-Length: 0\r\n\r\n").heads()[0]
    assert (head.status, head.reason) == (599, "")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"HTTP/1.1 2000 OK\r\n\r\n", "invalid_status_line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "invalid_status_line"),
        (b"HTTP/1.1 099 OK\r\n\r\n", "invalid_status_line"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "invalid_status_line"),
        (b"HTTP/1.1  200 OK\r\n\r\n", "invalid_status_line"),
        (b"HTTP/1.1 200 O\x00K\r\n\r\n", "invalid_status_line"),
        (b"http/1.1 200 OK\r\n\r\n", "invalid_status_line"),
        (b"ICY 200 OK\r\n\r\n", "invalid_status_line"),
        (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "invalid_status_line"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "unsupported_http_version"),
        (b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", "bare_cr_or_lf"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "both_content_length_and_transfer_encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "duplicate_content_length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "invalid_content_length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "unsupported_transfer_encoding"),
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "transfer_encoding_in_http10"),
        (b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n", "invalid_header_name"),
        (b"HTTP/1.1 200 OK\r\nX: y\r\n z\r\n\r\n", "obs_fold"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid_chunk_size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab", "invalid_chunk_data"),
    ],
)
def test_malformed_responses_are_502(data, reason):
    err = response_error(data)
    assert (err.status, err.reason) == (502, reason)


def test_response_limits_are_502():
    err = response_error(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200, max_header_bytes=100)
    assert (err.status, err.reason) == (502, "headers_too_large")
    err = response_error(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\n", max_headers=1)
    assert (err.status, err.reason) == (502, "too_many_headers")


def test_response_every_split_point():
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;a=b\r\nwiki\r\n5\r\npedia\r\n0\r\nX: y\r\n\r\n"
    )

    def factory(handler):
        parser = ResponseParser(handler)
        parser.expect("POST")
        return parser

    whole = feed_in_pieces(factory, data, []).normalised()
    assert whole[-1] == ("complete",)
    for cut in range(1, len(data)):
        assert feed_in_pieces(factory, data, [cut]).normalised() == whole, cut
    assert feed_in_pieces(factory, data, list(range(1, len(data)))).normalised() == whole


# --------------------------------------------------------------------------
# Parsed-line caches: a line seen before is not checked again, so neither its
# meaning nor the error a head gets may depend on what was parsed earlier


def test_a_cached_line_keeps_its_meaning_in_each_kind_of_block():
    # Host and Expect are special in requests only; Content-Length is refused in trailers.
    head = parse_request(req("Host: cache-a", "Expect: 100-continue", "Content-Length: 0")).heads()[0]
    assert head.authority == "cache-a" and head.expect_continue
    assert list(head.headers) == [("expect", "100-continue"), ("content-length", "0")]
    head = parse_response(b"HTTP/1.1 200 OK\r\nHost: cache-a\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n")
    assert list(head.heads()[0].headers) == [("host", "cache-a"), ("expect", "100-continue"), ("content-length", "0")]
    err = request_error(req("Host: h", "Transfer-Encoding: chunked", body=b"0\r\nContent-Length: 0\r\n\r\n"))
    assert (err.status, err.reason) == (400, "forbidden_trailer")
    # The other way round: first seen as a plain response field.
    parse_response(b"HTTP/1.1 200 OK\r\nHost: cache-b\r\nContent-Length: 0\r\n\r\n")
    head = parse_request(req("Host: cache-b")).heads()[0]
    assert head.authority == "cache-b" and list(head.headers) == []


def test_heads_built_from_cached_lines_do_not_share_their_header_lists():
    first = parse_request(GET).heads()[0]
    first.headers.set("accept", "text/html")
    first.headers.remove_all("user-agent")
    second = parse_request(GET).heads()[0]
    assert second.headers.get("accept") == "*/*" and second.headers.get("user-agent") == "test/1.0"


CHARACTER_PRECEDENCE = [
    # (head, parser options, status, reason, detail): a bad character is the
    # error, whatever else is wrong and wherever it is.
    (req("Host: h", "X@Y: z", "X-Foo: a\x01b"), {}, 400, "invalid_header_value", "0x01 at offset 41"),
    (req("Host: h", "X-Foo: a\x00", start="GET  / HTTP/1.1"), {}, 400, "invalid_header_value", "0x00 at offset 34"),
    (req("Host: h", "Host: h2", "X-Foo: \x7f"), {}, 400, "invalid_header_value", "0x7f at offset 42"),
    (req("Host: h", "X\x01: y", start="GET / HTTP/2.0"), {}, 400, "invalid_header_name", "0x01 at offset 26"),
    (req("Host: h", "X: y", start="GET /\x01 HTTP/1.1"), {}, 400, "invalid_request_line", "0x01 at offset 5"),
    (req("Host: h", "A: 1", "B: \x01"), {"max_headers": 2}, 400, "invalid_header_value", "0x01 at offset 34"),
    (req("Host: h", "A: 1", "B: \x01"), {"max_header_bytes": 20}, 400, "invalid_header_value", "0x01 at offset 34"),
    (
        req("Host: h", "Content-Length: 1", "Transfer-Encoding: chunked", "X: \x0b"),
        {},
        400,
        "invalid_header_value",
        "0x0b at offset 75",
    ),
]


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("data, options, status, reason, detail", CHARACTER_PRECEDENCE)
def test_bad_characters_win_over_other_faults(data, options, status, reason, detail, warm):
    if warm:  # the valid lines of these heads are all in the caches now
        parse_request(req("Host: h", "A: 1", "X: y", "Content-Length: 1", body=b"x"))
        parse_request(req("Host: h2", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"))
    err = request_error(data, **options)
    assert (err.status, err.reason, err.detail) == (status, reason, f"control character {detail}")


@pytest.mark.parametrize(
    "data, reason, detail",
    [
        (b"HTTP/1.1 200 O\x01K\r\n\r\n", "invalid_status_line", "0x01 at offset 14"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nX: \x01\r\n\r\n", "invalid_header_value", "0x01 at offset 39"),
        (b"HTTP/1.1 2000 OK\r\nX: \x01\r\n\r\n", "invalid_header_value", "0x01 at offset 21"),
    ],
)
def test_bad_characters_win_over_other_faults_in_responses(data, reason, detail):
    parse_response(RESP)  # "HTTP/1.1 200 OK" cached
    err = response_error(data)
    assert (err.status, err.reason, err.detail) == (502, reason, f"control character {detail}")


def test_line_caches_stay_bounded():
    from outrider.extensions.codecs.http1 import parser as module

    rec = Recorder()
    parser = RequestParser(rec)
    for i in range(module._LINE_CACHE_MAX + 10):
        parser.feed(req("Host: h", f"X-Junk: {i}", f"Content-Length: {i % 2}", body=b"x" * (i % 2)))
        parser.feed(req(f"Host: h{i}"))
    assert 0 < len(module._FIELD_CACHE) <= module._LINE_CACHE_MAX
    assert 0 < len(module._SPECIAL_CACHE) <= module._LINE_CACHE_MAX
    long_line = "X-Long: " + "a" * module._CACHED_LINE_MAX
    parser.feed(req("Host: h", long_line))
    assert long_line not in module._FIELD_CACHE
    assert rec.heads()[-1].headers == [("x-long", "a" * module._CACHED_LINE_MAX)]
    assert len(rec.heads()) == 2 * module._LINE_CACHE_MAX + 21


# --------------------------------------------------------------------------
# Serialisers


def test_serialize_request_head_round_trip():
    headers = Headers([("user-agent", "t/1"), ("x-multi", "a"), ("x-multi", "b"), ("content-length", "3")])
    head = RequestHead("POST", "/p?q=1", "example.com:8080", headers, content_length=3)
    data = serialize_request_head(head)
    assert data == (
        b"POST /p?q=1 HTTP/1.1\r\nhost: example.com:8080\r\nuser-agent: t/1\r\n"
        b"x-multi: a\r\nx-multi: b\r\ncontent-length: 3\r\n\r\n"
    )
    rec = parse_request(data + b"abc")
    parsed = rec.heads()[0]
    assert (parsed.method, parsed.path, parsed.authority) == ("POST", "/p?q=1", "example.com:8080")
    assert list(parsed.headers) == list(headers)
    assert parsed.content_length == 3 and rec.body() == b"abc"


def test_serialize_request_head_writes_http11_and_latin1():
    head = RequestHead("GET", "/", "h", Headers([("x-name", "caf\xe9")]), version="HTTP/1.0")
    data = serialize_request_head(head)
    assert data.startswith(b"GET / HTTP/1.1\r\n")
    assert b"x-name: caf\xe9\r\n" in data


def test_serialize_response_head_round_trip_and_default_reason():
    head = ResponseHead(404, Headers([("content-length", "0"), ("x-a", "b")]))
    data = serialize_response_head(head)
    assert data == b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nx-a: b\r\n\r\n"
    parsed = parse_response(data).heads()[0]
    assert (parsed.status, parsed.reason, list(parsed.headers)) == (404, "Not Found", list(head.headers))
    assert serialize_response_head(ResponseHead(200, Headers(), reason="Fine")).startswith(b"HTTP/1.1 200 Fine\r\n")
    assert serialize_response_head(ResponseHead(599, Headers())) == b"HTTP/1.1 599 \r\n\r\n"


def test_chunk_encoding_round_trip():
    assert encode_chunk(b"") == b""
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert encode_trailers(Headers()) == LAST_CHUNK
    trailers = Headers([("grpc-status", "0"), ("grpc-message", "ok")])
    assert encode_trailers(trailers) == b"0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n"
    head = serialize_request_head(RequestHead("POST", "/", "h", Headers([("transfer-encoding", "chunked")])))
    body = encode_chunk(b"abc") + encode_chunk(b"") + encode_chunk(b"defg") + encode_trailers(trailers)
    rec = parse_request(head + body)
    assert rec.body() == b"abcdefg"
    assert rec.normalised()[-2:] == [("trailers", list(trailers)), ("complete",)]


@pytest.mark.parametrize("bad", ["a\r\nx-injected: 1", "a\rb", "a\nb", "a\x00b", "a\r\n\r\nGET / HTTP/1.1"])
def test_serialisers_refuse_line_breaks_and_nul_in_values(bad):
    with pytest.raises(ValueError):
        serialize_request_head(RequestHead("GET", "/", "h", Headers([("x", bad)])))
    with pytest.raises(ValueError):
        serialize_response_head(ResponseHead(200, Headers([("x", bad)])))
    with pytest.raises(ValueError):
        encode_trailers(Headers([("x", bad)]))
    with pytest.raises(ValueError):
        serialize_request_head(RequestHead("GET", "/", bad, Headers()))
    with pytest.raises(ValueError):
        serialize_response_head(ResponseHead(200, Headers(), reason=bad))


@pytest.mark.parametrize("name", ["x y", "x:y", "", "x\r\ny", "x\x00"])
def test_serialisers_refuse_invalid_names(name):
    with pytest.raises(ValueError):
        serialize_response_head(ResponseHead(200, Headers([(name, "v")])))
    with pytest.raises(ValueError):
        encode_trailers(Headers([(name, "v")]))


@pytest.mark.parametrize("method, path", [("GET", "/a b"), ("GET", ""), ("GET", "/a\r\nb"), ("G T", "/"), ("GET", "/caf\u20ac")])
def test_serialize_request_refuses_bad_request_line(method, path):
    with pytest.raises(ValueError):
        serialize_request_head(RequestHead(method, path, "h", Headers()))


def test_serialize_response_refuses_bad_status():
    with pytest.raises(ValueError):
        serialize_response_head(ResponseHead(99, Headers()))
    with pytest.raises(ValueError):
        serialize_response_head(ResponseHead("200", Headers()))  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# drop_hop_by_hop: what the codecs use; the same result as strip_hop_by_hop


_HOP_BY_HOP_HEADS = [
    ["Connection: keep-alive", "X-A: 1"],
    ["Keep-Alive: timeout=5", "X-A: 1", "Connection: Keep-Alive, X-A, X-B", "X-B: 2", "X-C: 3"],
    ["TE: trailers", "X-A: 1", "Upgrade: websocket", "Connection: upgrade"],
    ["TE: gzip", "Proxy-Connection: keep-alive", "Trailer: X-T", "X-A: 1"],
    ["Connection: te", "TE: trailers", "X-A: 1"],
    ["X-A: 1", "X-B: 2"],
    ["Connection: close, content-length", "Content-Length: 0", "X-A: 1"],
]


@pytest.mark.parametrize("fields", _HOP_BY_HOP_HEADS)
def test_drop_hop_by_hop_matches_strip_hop_by_hop(fields):
    from outrider.extensions.codecs.http1.framing import strip_hop_by_hop

    request = ("\r\n".join(["GET / HTTP/1.1", "Host: h", *fields]) + "\r\n\r\n").encode()
    framing = [] if "Content-Length: 0" in fields else ["Content-Length: 0"]
    response = ("\r\n".join(["HTTP/1.1 200 OK", *fields, *framing]) + "\r\n\r\n").encode()
    for parse in (
        lambda **kw: parse_request(request, **kw).heads()[0],
        lambda **kw: parse_response(response, "GET", **kw).heads()[0],
    ):
        full, dropped = parse(), parse(drop_hop_by_hop=True)
        stripped = Headers(full.headers)
        strip_hop_by_hop(stripped)
        assert list(dropped.headers) == list(stripped)
        # Framing still sees the dropped fields.
        assert dropped.keep_alive == full.keep_alive
        assert {k: v for k, v in describe(dropped).items() if k != "headers"} == {
            k: v for k, v in describe(full).items() if k != "headers"
        }
