"""The C accelerator (``_speedups.c``) against the Python reference in
``parser.py``: the same results, or the same exception type and message,
for many generated heads, including every kind of bad input."""

from __future__ import annotations

import enum
import os
import random
import subprocess
import sys

import pytest

from outrider.extensions.codecs.http1 import parser
from outrider.extensions.codecs.http1.framing import HOP_BY_HOP
from outrider.http.message import Headers, RequestHead, ResponseHead

speedups = pytest.importorskip("outrider.extensions.codecs.http1._speedups")

# Each test here compares both implementations itself.
pytestmark = pytest.mark.parametrize("implementation", ["both"], indirect=True)


class Text(str):
    """A str subclass that formats differently from its value."""

    def __format__(self, spec: str) -> str:
        return "formatted"


class Kind(str, enum.Enum):
    PLAIN = "plain"


NAMES = [
    "host", "content-length", "x-custom", "X-Mixed-Case", "a", "!#$%&'*+-.^_`|~", "x" * 300,
    "", " x", "x ", "x:y", "bad name", "x\r\n", "x\x00", "\xe9t\xe9", "\u0100", "x\x7f",
    Text("x-sub"), Kind.PLAIN, 42, None, b"bytes",
]
VALUES = [
    "", "v", " padded ", "a\tb", "caf\xe9 \xa0nbsp", "\x7f", "\x01", "x\ry", "x\ny", "x\x00y", "\r\n",
    "\u20ac", "\U0001f600", "y" * 5000, Text("sub"), Kind.PLAIN, 7, None, 3.5,
]
METHODS = ["GET", "POST", "M-SEARCH", "PURGE", "", "GE T", "G\r", "G\x00", "\xe9", "\u0100", Text("GET"), 5]
PATHS = ["/", "/a?b=c", "*", "http://h/p", "", "/a b", "/a\tb", "/\r\n", "/\x00", "/caf\xe9", "/\u20ac", Text("/"), 1]
AUTHORITIES = ["example.com", "h:8080", "", "h\r\nx: y", "h\x00", "caf\xe9", "\u20ac", Text("h"), 9, None]
STATUSES = [200, 204, 404, 599, 999, 100, 99, 1000, 0, -1, True, 2**70, "200", 200.0, None]
REASONS = ["", "OK", "Fine", None, "r\r\n", "r\x00", "caf\xe9", "\u20ac", Text("T"), 0, "x" * 1000]


def pick_headers(rng: random.Random):
    def field():
        roll = rng.random()
        if roll < 0.04:
            return [rng.choice(NAMES), rng.choice(VALUES)]  # a list, not a tuple
        if roll < 0.06:
            return (rng.choice(NAMES), rng.choice(VALUES), "extra")
        if roll < 0.5:
            return ("x-field", "value")  # mostly valid heads reach the copy
        return (rng.choice(NAMES), rng.choice(VALUES))

    fields = [field() for _ in range(rng.randrange(8))]
    return rng.choice([Headers, list, list, tuple])(fields)


def outcome(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return (type(exc), str(exc), exc.args)


def configure(request_fallback, response_fallback):
    config = parser.speedups_config()
    speedups.configure(**{**config, "request_fallback": request_fallback, "response_fallback": response_fallback})


@pytest.fixture(autouse=True)
def configured():
    """parser.py configures the module unless OUTRIDER_NO_SPEEDUPS is set;
    configure it here too so that these tests run either way (and undo a
    test's own configuration)."""
    configure(parser.py_serialize_request_head, parser.py_serialize_response_head)
    yield
    configure(parser.py_serialize_request_head, parser.py_serialize_response_head)


def describe(head) -> str:
    return repr({slot: getattr(head, slot) for slot in type(head).__slots__})


@pytest.mark.parametrize("seed", range(20))
def test_request_heads_serialise_identically(seed):
    rng = random.Random(seed)
    for _ in range(500):
        valid = rng.random() < 0.3
        head = RequestHead(
            "GET" if valid else rng.choice(METHODS),
            "/p" if valid else rng.choice(PATHS),
            "h" if valid else rng.choice(AUTHORITIES),
            pick_headers(rng),
        )
        expected = outcome(parser.py_serialize_request_head, head)
        assert outcome(speedups.serialize_request_head, head) == expected, describe(head)


@pytest.mark.parametrize("seed", range(20))
def test_response_heads_serialise_identically(seed):
    rng = random.Random(seed)
    for _ in range(500):
        head = ResponseHead(rng.choice(STATUSES), pick_headers(rng), reason=rng.choice(REASONS))
        expected = outcome(parser.py_serialize_response_head, head)
        assert outcome(speedups.serialize_response_head, head) == expected, describe(head)


def test_common_heads_are_written_in_c():
    """The common case must not be handed back to Python (which would pass
    the comparisons above while saving nothing)."""
    calls = []

    def spy(head):
        calls.append(head)
        return b""

    configure(spy, spy)
    fields = Headers([("x-new-name-%d" % i, "v\xe9 \t") for i in range(3)])
    request = speedups.serialize_request_head(RequestHead("GET", "/", "h", fields))
    response = speedups.serialize_response_head(ResponseHead(200, fields))
    assert calls == []
    assert request == b"GET / HTTP/1.1\r\nhost: h\r\n" + b"".join(
        b"x-new-name-%d: v\xe9 \t\r\n" % i for i in range(3)
    ) + b"\r\n"
    assert response.startswith(b"HTTP/1.1 200 OK\r\nx-new-name-0: ")
    assert speedups.serialize_response_head(ResponseHead(200, Headers([("x", "\r")]))) == b""
    assert len(calls) == 1


def test_a_headers_subclass_that_iterates_differently_is_left_to_python():
    class Reversed(Headers):
        def __iter__(self):
            return reversed(list(super().__iter__()))

    head = RequestHead("GET", "/", "h", Reversed([("a", "1"), ("b", "2")]))
    assert speedups.serialize_request_head(head) == parser.py_serialize_request_head(head)
    assert b"b: 2\r\na: 1" in speedups.serialize_request_head(head)


def test_new_valid_names_join_the_shared_name_cache_as_in_python():
    name = "x-speedups-cache-probe"
    parser._OUT_NAMES.discard(name)
    speedups.serialize_request_head(RequestHead("GET", "/", "h", Headers([(name, "v")])))
    assert name in parser._OUT_NAMES


def test_the_accelerator_is_used_when_built_and_the_switch_turns_it_off():
    code = "from outrider.extensions.codecs.http1 import parser; print(parser.SPEEDUPS, parser.serialize_request_head.__module__)"
    env = {k: v for k, v in os.environ.items() if k != "OUTRIDER_NO_SPEEDUPS"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    off = subprocess.run(
        [sys.executable, "-c", code], env={**env, "OUTRIDER_NO_SPEEDUPS": "1"}, capture_output=True, text=True, check=True
    ).stdout
    assert on.split() == ["True", "outrider.extensions.codecs.http1._speedups"]
    assert off.split() == ["False", "outrider.extensions.codecs.http1.parser"]


# -- read_fields: the header loop of the parsers ------------------------------

FIELD_NAMES = [
    "Host", "host", "HOST", "Content-Length", "content-length", "Transfer-Encoding", "Connection", "Expect",
    "TE", "Keep-Alive", "Upgrade", "Proxy-Connection", "Trailer", "X-Request-Id", "traceparent", "User-Agent",
    "X-Custom", "x-custom", "a", "!#$%&'*+-.^_`|~", "x" * 600, "", " x", "\tx", "x ", "x\t", "bad name",
    "x\x00", "x\r", "x\n", "\xe9t\xe9", "x\x7f", "x;y",
]
FIELD_VALUES = [
    "", "v", "  padded\t ", "a\tb", "caf\xe9 \xa0", "\xa0", "\x7f", "\x01", "x\ry", "x\ny", "x\x00y",
    "close", "keep-alive, x-custom", "chunked", "12", " 12 ", "1,1", "100-continue", "trailers", "y" * 700,
]


def pick_line(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice(["no colon", "", ":", ": value", "x:y:z", " folded: line"])
    separator = rng.choice([":", ": ", ":\t", " :", ":  "])
    return rng.choice(FIELD_NAMES) + separator + rng.choice(FIELD_VALUES)


def clear_line_caches():
    parser._FIELD_CACHE.clear()
    parser._SPECIAL_CACHE.clear()


@pytest.mark.parametrize("seed", range(20))
def test_header_lines_read_identically(seed):
    """Each set of lines is read with empty caches and again with warm ones,
    by both implementations, with the request's, the response's and the
    trailers' arguments."""
    rng = random.Random(seed)
    for _ in range(300):
        lines = ["START LINE"] + [pick_line(rng) for _ in range(rng.randrange(6))]
        first, special, keep_out, hop, status = rng.choice(
            [
                (1, parser._REQUEST_SPECIAL, "host", HOP_BY_HOP, 400),
                (1, parser._REQUEST_SPECIAL, "host", None, 400),
                (1, parser._RESPONSE_SPECIAL, None, HOP_BY_HOP, 502),
                (1, parser._RESPONSE_SPECIAL, None, None, 502),
                (0, parser._FORBIDDEN_TRAILERS, None, None, 400),
            ]
        )
        args = (lines, first, special, keep_out, hop, status)
        clear_line_caches()
        expected = outcome(parser._py_read_fields, *args)
        clear_line_caches()
        cold = outcome(speedups.read_fields, *args)
        warm = outcome(speedups.read_fields, *args)
        warm_python = outcome(parser._py_read_fields, *args)
        assert cold == expected, lines
        assert warm == expected == warm_python, lines
        if type(expected) is tuple and type(expected[0]) is Headers:
            assert type(cold[0]) is Headers


@pytest.mark.parametrize("seed", range(10))
def test_whole_heads_parse_identically(seed, monkeypatch):
    """Through the parsers: the same heads (or errors) with either loop."""
    rng = random.Random(seed)
    for _ in range(200):
        fields = [pick_line(rng) for _ in range(rng.randrange(6))]
        request = "\r\n".join(["GET / HTTP/1.1", *fields]).encode("latin-1") + b"\r\n\r\n"
        response = "\r\n".join(["HTTP/1.1 200 OK", *fields]).encode("latin-1") + b"\r\n\r\n"
        drop = rng.random() < 0.5
        results = []
        for read_fields in (parser._py_read_fields, speedups.read_fields):
            monkeypatch.setattr(parser, "_read_fields", read_fields)
            clear_line_caches()
            results.append((parse(parser.RequestParser, request, drop), parse(parser.ResponseParser, response, drop)))
        assert results[0] == results[1], fields


class Recorder:
    def __init__(self):
        self.events = []

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.events.append((name, [describe(a) if hasattr(a, "__slots__") else a for a in args]))


def parse(parser_type, data: bytes, drop: bool):
    recorder = Recorder()
    p = parser_type(recorder, drop_hop_by_hop=drop)
    if parser_type is parser.ResponseParser:
        p.expect("GET")
    try:
        p.feed(data)
    except parser.ParseError as exc:
        recorder.events.append(("error", exc.args))
    return recorder.events


# -- split_head and request_line: the run loop and the request line ----------

BLOCK_PIECES = [b"\r\n", b"\r", b"\n", b"\r\r\n", b"\r\n\r\n", b"a", b"Host: h", b" ", b"\t", b"\x00", b"\x7f", b"\xe9", b"\xff"]


@pytest.mark.parametrize("seed", range(10))
def test_blocks_split_identically(seed):
    rng = random.Random(seed)
    for _ in range(500):
        data = b"".join(rng.choice(BLOCK_PIECES) for _ in range(rng.randrange(12)))
        start = rng.randrange(len(data) + 1)
        end = rng.randrange(start, len(data) + 1)
        for buf in (data, bytearray(data)):
            assert speedups.split_head(buf, start, end) == parser._py_split_head(buf, start, end), (data, start, end)


def test_split_head_refuses_indices_outside_the_buffer():
    for start, end in ((-1, 2), (2, 1), (0, 4), (5, 5)):
        with pytest.raises(ValueError):
            speedups.split_head(b"abc", start, end)
    with pytest.raises(TypeError):
        speedups.split_head("abc", 0, 1)


REQUEST_METHODS = ["GET", "POST", "OPTIONS", "CONNECT", "M-SEARCH", "get", "", "G(T", "G\tT", "G\x00", "\xe9", "G\x7f"]
REQUEST_TARGETS = [
    "/", "/a?b=c", "*", "http://h/p", "h:443", "", "/a#f", "#", "/\xe9", "/\x7f", "/\x00", "/\t", "/\r", "~", "/" + "p" * 300,
]
REQUEST_VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.10", "HTTP/1.", "", "HTTP/1.1 "]


def pick_request_line(rng: random.Random) -> str:
    parts = [rng.choice(REQUEST_METHODS), rng.choice(REQUEST_TARGETS), rng.choice(REQUEST_VERSIONS)]
    if rng.random() < 0.2:
        parts.insert(rng.randrange(4), rng.choice(["", "x", " "]))
    return rng.choice([" ", " ", " ", "  ", "\t"]).join(parts)


@pytest.mark.parametrize("seed", range(10))
def test_request_lines_read_identically(seed):
    rng = random.Random(seed)
    for _ in range(500):
        line = pick_request_line(rng)
        assert outcome(speedups.request_line, line) == outcome(parser._py_request_line, line), line
    for line in (Text("GET / HTTP/1.1"), "GET /\u20ac HTTP/1.1", 7):
        assert outcome(speedups.request_line, line) == outcome(parser._py_request_line, line), line


def test_common_request_lines_are_read_in_c():
    calls = []
    config = parser.speedups_config()
    speedups.configure(**{**config, "request_line_fallback": lambda line: calls.append(line) or ("", "", "")})
    assert speedups.request_line("GET /a?b=c HTTP/1.1") == ("GET", "/a?b=c", "HTTP/1.1")
    assert speedups.request_line("M-SEARCH * HTTP/1.0") == ("M-SEARCH", "*", "HTTP/1.0")
    assert calls == []
    speedups.request_line("GET /a#b HTTP/1.1")
    assert calls == ["GET /a#b HTTP/1.1"]


# Pieces of request and response streams: common messages, the shapes the
# run loop treats apart, and every kind of bad input.
REQUEST_STREAM_PIECES = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: v\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET http://h:8080/x HTTP/1.1\r\nHost: h\r\n\r\n",
    b"OPTIONS * HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\r\n",
    b"\r\n", b"\r\n\r\n", b"\n", b"\r",
    b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\x00\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"v" * 300 + b"\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 12 + b"Host: h\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /#f HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /\xe9 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: caf\xe9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
]
RESPONSE_STREAM_PIECES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nServer: s\r\nDate: d\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-T: v\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
    b"\r\n", b"\n", b"\r",
    b"HTTP/1.1 200 OK\r\n folded\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"v" * 300 + b"\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 12 + b"Content-Length: 0\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
]

#: parser.py's parsing functions that _speedups replaces -> (the Python
#: version, the C one).
REPLACED = {
    "_split_head": (parser._py_split_head, speedups.split_head),
    "_request_line": (parser._py_request_line, speedups.request_line),
    "_read_fields": (parser._py_read_fields, speedups.read_fields),
}


def feed_in_pieces(p, stream: bytes, rng: random.Random, recorder) -> None:
    """Feed ``stream`` cut at random places (often one byte at a time),
    sometimes as bytearrays, resuming whenever a message paused the parser."""
    pos = 0
    try:
        while pos < len(stream):
            size = rng.choice([1, 1, 2, 3, 7, 64, len(stream)])
            piece = stream[pos : pos + size]
            pos += size
            p.feed(bytearray(piece) if rng.random() < 0.2 else piece)
            while p.paused:
                p.resume()
        p.feed_eof()
    except parser.ParseError as exc:
        recorder.events.append(("error", exc.args))


class PausingRecorder(Recorder):
    """Pauses after some messages, as a proxy waiting for its upstream does."""

    def __init__(self, rng):
        super().__init__()
        self.rng = rng

    def on_message_complete(self):
        self.events.append(("on_message_complete", []))
        return self.rng.random() < 0.3


def parse_stream(parser_type, stream: bytes, seed: int):
    rng = random.Random(seed)
    recorder = PausingRecorder(rng)
    p = parser_type(recorder, max_header_bytes=rng.choice([60 * 1024, 200]), max_headers=rng.choice([100, 8]),
                    drop_hop_by_hop=rng.random() < 0.5)
    if parser_type is parser.ResponseParser:
        for _ in range(20):
            p.expect(rng.choice(["GET", "GET", "HEAD"]))
    feed_in_pieces(p, stream, rng, recorder)
    return recorder.events


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("parser_type", [parser.RequestParser, parser.ResponseParser])
def test_streams_parse_identically_however_they_are_cut(seed, parser_type, monkeypatch):
    """Pipelined messages, good and bad, cut anywhere: the same events and
    errors with the C functions as with the Python ones."""
    rng = random.Random(seed)
    pieces = REQUEST_STREAM_PIECES if parser_type is parser.RequestParser else RESPONSE_STREAM_PIECES
    for _ in range(30):
        stream = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 5)))
        cut_seed = rng.random()
        results = []
        for implementation in (0, 1):
            for name, versions in REPLACED.items():
                monkeypatch.setattr(parser, name, versions[implementation])
            clear_line_caches()
            results.append(parse_stream(parser_type, stream, cut_seed))
        assert results[0] == results[1], stream
