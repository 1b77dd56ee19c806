"""The access log formatter, filters and format validation (core/access_log.py)."""

from __future__ import annotations

import calendar
import json
import re
import time
from typing import Any

import pytest

from outrider.access_log import (
    DEFAULT_FORMAT,
    OPERATORS,
    AccessLogs,
    FormatSyntaxError,
    LogInfoDefaults,
    compile_filter,
    compile_deferred_format,
    compile_deferred_json_format,
    compile_format,
    compile_json_format,
    parse_format,
    wall_start_time,
)
from outrider.config import ConfigInvalid, load_config_text
from outrider.http.message import Headers, RequestHead, ResponseHead
from outrider.registry import load_registry
from outrider.stats import StatsStore


class Conn:
    def __init__(self, ip: str = "10.1.2.3", port: int = 51234) -> None:
        self.remote_ip = ip
        self.remote_port = port


class Route:
    name = "api/0"


class Info(LogInfoDefaults):
    """An AccessLogInfo with everything set, like a finished proxied stream."""

    def __init__(self, **overrides: Any) -> None:
        now = time.monotonic()
        self.start_time = now - 0.250
        self.request_end_time = now - 0.240
        self.upstream_first_byte_time = now - 0.100
        self.request = RequestHead(
            "POST", "/v1/items?x=1", "api.example.com",
            Headers([("user-agent", "curl/8.0"), ("x-forwarded-for", "1.1.1.1"),
                     ("x-request-id", "rid-1"), ("x-dup", "first"), ("x-dup", "second")]),
            version="HTTP/1.1",
        )
        self.response = ResponseHead(201, Headers([("content-type", "text/plain"), ("x-envoy-upstream-service-time", "150")]))
        self.response_trailers = Headers([("grpc-status", "0")])
        self.response_flags = ()
        self.response_code_details = ""
        self.bytes_received = 1234
        self.bytes_sent = 56
        self.upstream_host = "127.0.0.1:8080"
        self.upstream_cluster = "api"
        self.route = Route()
        self.request_id = "rid-1"
        self.conn = Conn()
        for key, value in overrides.items():
            setattr(self, key, value)

    @property
    def connection(self) -> Any:
        return self.conn


def fmt(text: str, info: Any) -> str:
    return compile_format(text)(info)


# -- operators ------------------------------------------------------------------


def test_default_format_is_envoys_and_renders_every_field():
    info = Info()
    line = compile_format(None)(info)
    assert line.endswith("\n")
    m = re.fullmatch(
        r'\[(\S+)\] "(\S+) (\S+) (\S+)" (\d+) (\S+) (\d+) (\d+) (\d+) (\S+) "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)"\n',
        line,
    )
    assert m, line
    start, method, path, proto, code, flags, rx, tx, duration, svc, xff, ua, rid, authority, host = m.groups()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", start)
    assert (method, path, proto, code, flags, rx, tx) == ("POST", "/v1/items?x=1", "HTTP/1.1", "201", "-", "1234", "56")
    assert 250 <= int(duration) < 1000
    assert (svc, xff, ua, rid, authority, host) == ("150", "1.1.1.1", "curl/8.0", "rid-1", "api.example.com", "127.0.0.1:8080")
    # The original path wins over the (rewritten) path when the router kept one.
    info.request.headers.append(("x-envoy-original-path", "/api/v1/items?x=1"))
    assert '"POST /api/v1/items?x=1 HTTP/1.1"' in compile_format(DEFAULT_FORMAT)(info)


def test_start_time_default_and_strftime_forms():
    info = Info()
    expected = wall_start_time(info)
    text = fmt("%START_TIME%", info)
    seconds = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    assert abs(seconds + int(text[20:23]) / 1000 - expected) < 0.01
    assert text[19] == "." and text[23:] == "Z"

    # Streams starting in the same millisecond share the rendered text; others do not.
    start = compile_format("%START_TIME%")
    later = Info(start_time=info.start_time + 0.0015)
    same = Info(start_time=info.start_time)
    first, second, third = start(info), start(later), start(same)
    assert first == third != second
    assert 1 <= (int(second[20:23]) - int(first[20:23])) % 1000 <= 2

    out = fmt("%START_TIME(%Y/%m/%d %H:%M:%S|%s|%3f|%6f|%9f|%f|%%)%", info)
    date, epoch, f3, f6, f9, f, pct = out.split("|")
    assert time.strftime("%Y/%m/%d %H:%M:%S", time.gmtime(int(epoch))) == date  # UTC
    assert abs(int(epoch) - expected) < 1.01
    assert (len(f3), len(f6), len(f9), len(f)) == (3, 6, 9, 9)
    assert f6.startswith(f3) and f9.startswith(f6[:5]) and pct == "%"
    assert abs(int(epoch) + int(f6) / 1e6 - expected) < 0.01


def test_request_response_and_trailer_headers():
    info = Info()
    assert fmt("%REQ(:METHOD)% %REQ(:PATH)% %REQ(:AUTHORITY)% %REQ(:SCHEME)%", info) == "POST /v1/items?x=1 api.example.com http"
    assert fmt("%REQ(User-Agent)%|%REQ(x-missing)%|%REQ(x-missing?user-agent)%|%REQ(user-agent?x-forwarded-for)%", info) == \
        "curl/8.0|-|curl/8.0|curl/8.0"
    assert fmt("%REQ(x-dup)%", info) == "first"
    assert fmt("%REQ(user-agent):4%|%REQ(:PATH):3%|%REQ(x-none):2%", info) == "curl|/v1|-"
    assert fmt("%RESP(content-type)%|%RESP(:status)%|%RESP(x-none)%", info) == "text/plain|201|-"
    assert fmt("%TRAILER(grpc-status)%|%TRAILER(x-none)%", info) == "0|-"
    assert fmt("%REQ_ID%|%REQ(X-REQUEST-ID)%", info) == "rid-1|rid-1"
    # Several headers of one message, found in one pass, with and without a match.
    assert fmt("%REQ(x-forwarded-for)% %REQ(user-agent)% %REQ(x-none)% %REQ(x-dup)%", info) == "1.1.1.1 curl/8.0 - first"


def test_an_alternative_header_and_a_length_limit_in_one_operator():
    """%REQ(X?Y):Z%: the first header present is taken, then cut to Z
    characters; the compiled, deferred and JSON forms agree."""
    info = Info(response_trailers=Headers([("grpc-message", "everything fine")]))
    cases = {
        "%REQ(x-none?user-agent):4%": "curl",  # the alternative, truncated
        "%REQ(user-agent?x-forwarded-for):2%": "cu",  # the first one wins, truncated
        "%REQ(x-none?x-forwarded-for):100%": "1.1.1.1",  # shorter than the limit: whole
        "%REQ(x-none?x-also-none):4%": "-",  # neither: no value, not a truncated dash
        "%REQ(x-none?:PATH):3%": "/v1",  # a pseudo-header as the alternative
        "%RESP(x-none?content-type):4%": "text",
        "%TRAILER(x-none?grpc-message):5%": "every",
    }
    for text, expected in cases.items():
        assert fmt(text, info) == expected, text
        (op,) = parse_format(text)
        assert op.getter(info) == (None if expected == "-" else expected), text
    line = " ".join(cases)
    deferred = compile_deferred_format(line)
    lines: list[str] = []
    deferred.render([deferred.capture(info)], lines.append)
    assert lines == [" ".join(cases.values())]
    as_json = compile_json_format({"ua": "%REQ(x-none?user-agent):4%", "none": "%REQ(x-none?x-also-none):4%"})
    assert as_json(info) == {"ua": "curl", "none": None}
    # The same header text without the limit, and a request without the header.
    assert fmt("%REQ(x-none?user-agent)%", info) == "curl/8.0"
    info.request.headers.set("x-none", "first-choice")
    assert fmt("%REQ(x-none?user-agent):4%", info) == "firs"


def test_codes_flags_bytes_upstream_route_protocol():
    info = Info(response_flags=("UT", "URX"))
    assert fmt("%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %PROTOCOL%", info) == "201 UT,URX 1234 56 HTTP/1.1"
    assert fmt("%UPSTREAM_HOST% %UPSTREAM_CLUSTER% %ROUTE_NAME%", info) == "127.0.0.1:8080 api api/0"
    assert fmt("%RESPONSE_CODE_DETAILS%", info) == "via_upstream"
    info.response_code_details = "upstream_response_timeout"
    assert fmt("%RESPONSE_CODE_DETAILS%", info) == "upstream_response_timeout"


def test_durations_in_milliseconds():
    info = Info()
    duration, request, response, tx = map(int, fmt("%DURATION% %REQUEST_DURATION% %RESPONSE_DURATION% %RESPONSE_TX_DURATION%", info).split())
    assert 250 <= duration < 1000
    assert request == 10 or request == 9  # float rounding of 250ms - 240ms
    assert response in (149, 150)
    assert 100 <= tx < 1000
    info.request_end_time = info.upstream_first_byte_time = 0.0
    assert fmt("%REQUEST_DURATION% %RESPONSE_DURATION% %RESPONSE_TX_DURATION%", info) == "- - -"


def test_downstream_addresses():
    assert fmt("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", Info()) == "10.1.2.3:51234 10.1.2.3"
    assert fmt("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", Info(conn=Conn("::1", 9))) == "[::1]:9 ::1"
    assert fmt("%DOWNSTREAM_REMOTE_ADDRESS%", Info(conn=Conn("", 0))) == "-"


def test_missing_values_print_a_dash_and_no_response_is_code_0():
    info = Info(request=None, response=None, response_trailers=None, route=None, upstream_host=None,
                upstream_cluster=None, request_id="", upstream_first_byte_time=0.0)
    line = fmt(
        "%REQ(:METHOD)% %REQ(:PATH)% %REQ(user-agent)% %REQ(a?b)% %RESP(x)% %TRAILER(x)% %PROTOCOL% %RESPONSE_CODE% "
        "%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %ROUTE_NAME% %REQ_ID%", info,
    )
    assert line == "- - - - - - - 0 - - - - - -"


def test_every_operator_inline_and_getter_agree():
    """The generated function inlines most operators: it must say exactly
    what each operator's getter says, for a full and an empty stream."""
    samples = {
        "REQ": ["(:METHOD)", "(:PATH)", "(:AUTHORITY)", "(:SCHEME)", "(user-agent)", "(x-none?user-agent)", "(x-request-id)", "(user-agent):3"],
        "RESP": ["(content-type)", "(:status)", "(x-none)"],
        "TRAILER": ["(grpc-status)"],
        "START_TIME": ["", "(%s)"],
    }
    empty = Info(request=None, response=None, response_trailers=None, route=None, upstream_host=None,
                 upstream_cluster=None, request_id="", request_end_time=0.0, upstream_first_byte_time=0.0,
                 response_flags=("DC",), conn=Conn("", 0))
    for name in OPERATORS:
        for arg in samples.get(name, [""]):
            text = f"%{name}{arg}%"
            (op,) = parse_format(text)
            for info in (Info(), empty):
                value = op.getter(info)
                if name in ("DURATION", "RESPONSE_TX_DURATION", "START_TIME"):
                    continue  # time moves between the two calls
                assert compile_format(text)(info) == ("-" if value is None else str(value)), text


def test_deferred_format_renders_the_same_lines_from_what_it_captured():
    """The file logger captures at stream end and renders in batches: the
    lines must be compile_format's, with the values of the capture time."""
    texts = [DEFAULT_FORMAT, "x\n", "%DURATION%", '{a} "%REQ(:PATH)%" %%'] + [
        f"%{name}{arg}%" for name in OPERATORS
        for arg in {"REQ": ["(user-agent)", "(x-none?:path)", "(x-request-id)", "(user-agent):3"],
                    "RESP": ["(content-type)", "(:status)"], "TRAILER": ["(grpc-status)"]}.get(name, [""])
    ]
    empty = Info(request=None, response=None, response_trailers=None, route=None, upstream_host=None,
                 upstream_cluster=None, request_id="", request_end_time=0.0, upstream_first_byte_time=0.0)
    for text in texts:
        deferred = compile_deferred_format(text)
        for info in (Info(), Info(response_flags=("UF", "URX")), empty):
            lines: list[str] = []
            deferred.render([deferred.capture(info), deferred.capture(info)], lines.append)
            expected = compile_format(text)(info)
            if "DURATION" in text:  # time moves between the calls; compare the shape
                expected, lines = re.sub(r"\b\d+\b", "N", expected), [re.sub(r"\b\d+\b", "N", x) for x in lines]
            assert lines == [expected, expected], text

    # What happens to the stream after its capture does not reach the line.
    deferred = compile_deferred_format("%DURATION% %BYTES_SENT% %RESPONSE_FLAGS% %REQ_ID% %UPSTREAM_HOST% %ROUTE_NAME%")
    info = Info()
    captured = deferred.capture(info)
    info.bytes_sent, info.response_flags, info.request_id, info.upstream_host, info.route = 1, ("DC",), "x", "h", None
    time.sleep(0.3)
    lines = []
    deferred.render([captured], lines.append)
    duration, rest = lines[0].split(" ", 1)
    assert 250 <= int(duration) < 500
    assert rest == "56 - rid-1 127.0.0.1:8080 api/0"


def test_literals_are_kept_exactly():
    info = Info()
    assert fmt('a{b}"c\\d\t%%|%RESPONSE_CODE%', info) == 'a{b}"c\\d\t%|201'
    # Non-latin-1 literals become their UTF-8 bytes (as latin-1 text): the
    # writer encodes lines as latin-1, so the file gets UTF-8.
    assert fmt("→ %RESPONSE_CODE%", info).encode("latin-1") == "→ 201".encode("utf-8")


# -- bad formats ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, offset, words",
    [
        ("abc %BOGUS% x", 4, "unknown command operator %BOGUS%"),
        ("%RESPONSE_CODES%", 0, "did you mean %RESPONSE_CODE%"),
        ("%req(:path)%", 0, "did you mean %REQ%"),
        ("100% done", 3, "starts no command operator"),
        ("x %REQ(user-agent)", 2, "is not closed"),
        ("%REQ%", 0, "needs a header name"),
        ("%REQ()%", 0, "needs a header name"),
        ("%REQ(:foo)%", 0, "unknown pseudo-header"),
        ("%REQ(a?b?c)%", 0, "at most one alternative"),
        ("%REQ(bad header)%", 0, "is not a header name"),
        ("%DURATION(x)%", 0, "takes no argument"),
        ("%DURATION:10%", 0, "only REQ, RESP and TRAILER take a length limit"),
        ("%REQ(a):0%", 0, "positive number"),
        ("%START_TIME(%Y %Q)%", 15, "unknown time directive '%Q'"),
    ],
)
def test_bad_formats_are_refused_with_their_position(text, offset, words):
    with pytest.raises(FormatSyntaxError) as info:
        parse_format(text)
    assert words in str(info.value)
    assert info.value.offset == offset
    assert info.value.token and info.value.token in text


def test_validation_points_inside_the_format_string():
    registry = load_registry()
    text = """\
listeners:
  - name: web
    address: 127.0.0.1:10000
    http:
      stat_prefix: web
      virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: /}, direct_response: {status: 200}}]}]
    access_log:
      - name: file
        config:
          path: /tmp/x.log
          format: '[%START_TIME%] "%REQ(:METHOD)%" %RESPONSE_CODEZ% %DURATION%'
      - name: file
        config:
          path: /tmp/y.log
          json_format:
            status: "%RESPONSE_CODE%"
            nested: {agent: "ua=%REQ(user-agent)", ok: "%BYTES_SENT%"}
"""
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, registry, source="x.yaml")
    errors = [str(e) for e in info.value.errors]
    line11 = text.splitlines()[10]
    line17 = text.splitlines()[16]
    assert errors == [
        f"x.yaml:11:{line11.index('%RESPONSE_CODEZ%') + 1}: listeners[0].access_log[0].config.format: "
        "unknown command operator %RESPONSE_CODEZ% (did you mean %RESPONSE_CODE%?)",
        f"x.yaml:17:{line17.index('%REQ') + 1}: listeners[0].access_log[1].config.json_format.nested.agent: "
        "command operator %REQ at character 4 is not closed: expected %NAME%, %NAME(arg)% or %NAME(arg):N%",
    ]


# -- json_format ----------------------------------------------------------------


def test_json_format_keeps_types_nests_and_nulls_missing_values():
    build = compile_json_format({
        "status": "%RESPONSE_CODE%",
        "bytes": {"in": "%BYTES_RECEIVED%", "out": "%BYTES_SENT%"},
        "path": "%REQ(:PATH)%",
        "upstream": "%UPSTREAM_HOST%",
        "missing": "%REQ(x-none)%",
        "mixed": "code=%RESPONSE_CODE% ua=%REQ(x-none)%",
        "constant": "edge",
        "number": 7,
        "flag": True,
        "nothing": None,
        "duration": "%DURATION%",
    })
    out = json.loads(json.dumps(build(Info())))
    assert out["status"] == 201 and out["bytes"] == {"in": 1234, "out": 56}
    assert (out["path"], out["upstream"], out["missing"]) == ("/v1/items?x=1", "127.0.0.1:8080", None)
    assert out["mixed"] == "code=201 ua=-"
    assert (out["constant"], out["number"], out["flag"], out["nothing"]) == ("edge", 7, True, None)
    assert isinstance(out["duration"], int)
    assert list(out) == ["status", "bytes", "path", "upstream", "missing", "mixed", "constant", "number", "flag", "nothing", "duration"]


def test_deferred_json_lines_are_the_encoded_mapping():
    """The file logger renders JSON lines from generated code, not through a
    dict and the encoder: the text must be the encoder's, byte for byte."""
    mapping = {
        "status": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%", "details": "%RESPONSE_CODE_DETAILS%",
        "bytes": {"in": "%BYTES_RECEIVED%", "out": "%BYTES_SENT%", "deeper": {"x": "%REQ(x-dup)%"}},
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", "ua": "%REQ(user-agent):4%", "ct": "%RESP(content-type)%",
        "trailer": "%TRAILER(grpc-status)%", "route": "%ROUTE_NAME%", "remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "rid": "%REQ_ID%", "mixed": 'say "%REQ(:METHOD)%" {to} %UPSTREAM_HOST% \u00e9\t%%', "when": "%START_TIME(%s)%",
        "constant": "caf\u00e9 \"quoted\"", "n": 7, "f": 1.5, "yes": True, "nothing": None, "k\u00e9y \"q\"": "%PROTOCOL%",
        "rq": "%REQUEST_DURATION%",
    }
    encode = json.JSONEncoder(separators=(",", ":")).encode
    deferred = compile_deferred_json_format(mapping)
    odd = Info(request=RequestHead("GET", "/caf\xe9", "h", Headers([("user-agent", 'a"b\\c\x01\xff'), ("x-dup", "\u00e9")])),
               response_flags=("UF",), response_code_details="upstream_reset")
    empty = Info(request=None, response=None, response_trailers=None, route=None, upstream_host=None,
                 upstream_cluster=None, request_id="", request_end_time=0.0, upstream_first_byte_time=0.0, conn=Conn("", 0))
    for info in (Info(), odd, empty):
        lines: list[str] = []
        deferred.render([deferred.capture(info)], lines.append)
        assert lines == [encode(compile_json_format(mapping)(info)) + "\n"]
        json.loads(lines[0])
    for bad in ({"a": [1]}, ["%PROTOCOL%"]):
        with pytest.raises(ValueError, match="json_format"):
            compile_deferred_json_format(bad)  # type: ignore[arg-type]


# -- filters ----------------------------------------------------------------------


def status(code: int | None) -> Info:
    return Info(response=None if code is None else ResponseHead(code, Headers()))


def test_status_code_filter_compares():
    ge = compile_filter({"status_code": {"ge": 400}})
    assert [ge(status(c)) for c in (200, 399, 400, 503)] == [False, False, True, True]
    assert ge(status(None)) is False  # no response: code 0
    window = compile_filter({"status_code": {"ge": 500, "le": 503, "ne": 502}})
    assert [window(status(c)) for c in (499, 500, 502, 503, 504)] == [False, True, False, True, False]
    eq = compile_filter({"status_code": {"eq": 404}})
    assert [eq(status(c)) for c in (404, 405)] == [True, False]


def test_duration_filter():
    slow = compile_filter({"duration": {"ge": 0.2}})
    fast = compile_filter({"duration": {"le": "100ms"}})
    info = Info()  # started 250ms ago
    assert slow(info) and not fast(info)
    info.start_time = time.monotonic()
    assert not slow(info) and fast(info)


def test_not_health_check_and_header_filters():
    not_hc = compile_filter({"not_health_check": True})
    assert not_hc(Info())
    assert not not_hc(Info(is_health_check=True))
    probe = Info()
    probe.request.headers.set("user-agent", "Envoy/HC")
    assert not not_hc(probe)
    assert not_hc(Info(request=None))  # TCP

    canary = compile_filter({"header": {"name": "x-forwarded-for", "exact": "1.1.1.1"}})
    assert canary(Info()) and not canary(Info(request=None))
    absent = compile_filter({"header": {"name": "x-debug", "present": False}})
    assert absent(Info()) and absent(Info(request=None))
    inverted = compile_filter({"header": {"name": ":method", "exact": "GET", "invert_match": True}})
    assert inverted(Info())


def test_sampling_filter_and_combinations():
    assert compile_filter({"sampling": 100}) is None
    never = compile_filter({"sampling": 0})
    assert not any(never(Info()) for _ in range(100))
    half = compile_filter({"sampling": 50})
    hits = sum(half(Info()) for _ in range(4000))
    assert 1600 < hits < 2400
    both = compile_filter({"status_code": {"ge": 500}, "sampling": 0})
    assert not both(status(503))
    assert compile_filter({}) is None and compile_filter(None) is None


def test_a_logger_that_raises_costs_a_stat_not_the_stream():
    class Broken:
        def log(self, info: Any) -> None:
            raise RuntimeError("boom")

    class Good:
        lines: list[Any] = []

        def log(self, info: Any) -> None:
            self.lines.append(info)

    stats = StatsStore()
    logs = AccessLogs([("broken", None, Broken()), ("good", compile_filter({"status_code": {"ge": 500}}), Good())], stats)
    logs.observe(status(503))
    logs.observe(status(200))
    assert stats.counter("access_logs.log_error").value == 2
    assert len(Good.lines) == 1
    single = AccessLogs([("broken", None, Broken())], stats)
    single.observe(Info())
    assert stats.counter("access_logs.log_error").value == 3
