"""Access logs: what the core hands a logger, the command-operator formatter,
and the ``access_log:`` filters.

The contract
------------
An ``access_loggers`` extension's factory is called once per ``access_log:``
entry of a listener, at config time, as ``factory(config, ctx)``. It returns
an object with

- ``log(info)``: called once per finished HTTP stream or TCP connection, on
  the event loop, right when it ends. ``info`` is an :class:`AccessLogInfo`.
  Read what you need *now* (the object is reused or mutated afterwards;
  only its ``request`` and ``response`` heads, which the core never changes
  once the stream ended, may be kept) and never block: hand the line to a
  buffer, not to a file.
- ``reopen()`` (optional): reopen files (SIGUSR1, for log rotation).
- ``close()`` (optional): flush and release everything (the server stops).

The factory must not open files or start threads: ``outrider validate``
builds every object too. Do that lazily, on the first ``log``.

Formatting is shared: :func:`compile_format` turns an Envoy format string
(``%START_TIME%``, ``%REQ(:PATH)%``, ...) into a function ``info -> str``,
:func:`compile_json_format` a ``json_format`` mapping into ``info -> dict``.
:func:`compile_deferred_format` and :func:`compile_deferred_json_format`
split a format into a capture per stream and a rendering of many lines at
once (see :class:`DeferredFormat`).
All parse once, at config time; per request they only call small getters.
A schema marks a format string with ``"format": "access_log_format"`` so that
``outrider validate`` reports a bad one at its ``file:line:column``.
"""

from __future__ import annotations

import difflib
import json
import logging
import random
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple, Protocol

from .http.routing import HeaderMatcher
from .sinks import RateLimitedLog

if TYPE_CHECKING:  # pragma: no cover
    from .context import BuildContext
    from .http.message import Headers, RequestHead, ResponseHead

log = logging.getLogger("outrider.access_log")


# -- what a logger receives -----------------------------------------------------

class AccessLogConnection(Protocol):
    """The downstream connection of a logged stream."""

    #: The peer's IP address ("" when unknown).
    remote_ip: str
    #: The peer's port (0 when unknown). Optional: read it with getattr.
    remote_port: int


class AccessLogInfo(Protocol):
    """Everything the core knows about one finished HTTP stream (the
    ``ActiveStream`` of ``outrider.http.conn_manager``) or TCP connection (a
    listener protocol's session, e.g. tcp_proxy's), under the same names.

    Times are ``time.monotonic()`` seconds; ``0.0`` means "did not happen".
    :func:`wall_start_time` converts ``start_time`` to a Unix timestamp.
    """

    #: When the stream (the request head was parsed) or connection began.
    start_time: float
    #: When the last byte of the request arrived (HTTP; 0.0 if it did not).
    request_end_time: float
    #: When the upstream's response head arrived (0.0: no upstream response).
    upstream_first_byte_time: float
    #: ``None`` for TCP, and for a request head the codec refused (flag DPE).
    request: "RequestHead | None"
    #: ``None`` when no response was sent (e.g. the client went away first).
    response: "ResponseHead | None"
    response_trailers: "Headers | None"
    #: Envoy's response flags (``UF``, ``UT``, ``NR``, ``DC``...), in order set.
    response_flags: tuple[str, ...]
    #: Why the proxy answered as it did (``route_not_found``...); "" when the
    #: upstream answered.
    response_code_details: str
    #: Body bytes (HTTP) or stream bytes (TCP) from and to the downstream.
    bytes_received: int
    bytes_sent: int
    #: ``host:port`` of the last upstream host tried, and its cluster.
    upstream_host: str | None
    upstream_cluster: str | None
    #: The matched route (``.name``), ``None`` when none matched or for TCP.
    route: Any
    #: The ``x-request-id`` (HTTP with generate_request_id), else "".
    request_id: str
    #: Set by a filter that recognised a health check request.
    is_health_check: bool
    #: The client's IP when inferred from x-forwarded-for (HTTP; see
    #: ``xff_num_trusted_hops``), else "": the connection's peer is the client.
    client_ip: str
    connection: AccessLogConnection


class LogInfoDefaults:
    """Class-level defaults of every :class:`AccessLogInfo` field: a listener
    protocol's session class can inherit them and set only what it knows."""

    start_time = 0.0
    request_end_time = 0.0
    upstream_first_byte_time = 0.0
    request: Any = None
    response: Any = None
    response_trailers: Any = None
    response_flags: tuple[str, ...] = ()
    response_code_details = ""
    bytes_received = 0
    bytes_sent = 0
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    route: Any = None
    request_id = ""
    is_health_check = False
    client_ip = ""
    remote_ip = ""
    remote_port = 0

    @property
    def connection(self) -> Any:
        return self


_monotonic = time.monotonic
_time = time.time


def wall_start_time(info: AccessLogInfo) -> float:
    """``info.start_time`` as a Unix timestamp (seconds)."""
    return _time() - (_monotonic() - info.start_time)


# -- the format language --------------------------------------------------------

class FormatSyntaxError(ValueError):
    """A format string that does not parse; ``offset`` is where in it
    (0-based), ``token`` the text at fault (to locate it in a config file)."""

    def __init__(self, message: str, offset: int, token: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.token = token


#: Envoy's default access log format.
DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

Getter = Callable[[Any], Any]

_OPERATOR = re.compile(r"%([A-Za-z0-9_]+)(?:\(([^)]*)\))?(?::([0-9]*))?%")
_NAME_START = re.compile(r"%([A-Za-z0-9_]+)")
_HEADER_NAME = re.compile(r":?[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PSEUDO_REQUEST = (":method", ":path", ":authority", ":scheme")
_PSEUDO_RESPONSE = (":status",)


class Operator:
    """One compiled ``%NAME(arg):N%``: ``getter(info)`` gives its typed value
    (``int`` or ``str``), or ``None`` when there is none ("-" in text).

    ``inline``, when set, is the same getter as a Python expression over
    ``info.<attribute>``, ``_req`` (``info.request``), ``_resp``
    (``info.response``) and ``_now`` (``time.monotonic()`` at the end of the
    stream): :func:`compile_format` writes it into the generated function,
    saving a call per operator per line, and :func:`compile_deferred_format`
    captures exactly those values per stream.
    """

    __slots__ = ("text", "getter", "never_none", "inline")

    def __init__(self, text: str, getter: Getter, never_none: bool = False, inline: str | None = None) -> None:
        self.text = text
        self.getter = getter
        self.never_none = never_none
        self.inline = inline

    def __repr__(self) -> str:
        return f"<Operator {self.text}>"


def _code(info: Any) -> int:
    response = info.response
    return response.status if response is not None else 0


def _details(info: Any) -> str | None:
    details = info.response_code_details
    if details:
        return details
    return "via_upstream" if info.upstream_first_byte_time and info.response is not None else None


def _flags(info: Any) -> str | None:
    flags = info.response_flags
    return ",".join(flags) if flags else None


def _protocol(info: Any) -> str | None:
    request = info.request
    return request.version if request is not None else None


def _bytes_received(info: Any) -> int:
    return info.bytes_received


def _bytes_sent(info: Any) -> int:
    return info.bytes_sent


def _duration(info: Any) -> int:
    return int((_monotonic() - info.start_time) * 1000)


def _request_duration(info: Any) -> int | None:
    end = info.request_end_time
    return int((end - info.start_time) * 1000) if end else None


def _response_duration(info: Any) -> int | None:
    first = info.upstream_first_byte_time
    return int((first - info.start_time) * 1000) if first else None


def _response_tx_duration(info: Any) -> int | None:
    first = info.upstream_first_byte_time
    return int((_monotonic() - first) * 1000) if first else None


def _upstream_host(info: Any) -> str | None:
    return info.upstream_host or None


def _upstream_cluster(info: Any) -> str | None:
    return info.upstream_cluster or None


def _route_name(info: Any) -> str | None:
    route = info.route
    return route.name if route is not None else None


def _scan(headers: "Headers", name: str) -> str | None:
    """The first value of ``name`` (lower-case) in ``headers``."""
    for k, v in headers:
        if k == name:
            return v
    return None


def _request_id(info: Any) -> str | None:
    return info.request_id or _request_id_header(info.request)


def _request_id_header(request: Any) -> str | None:
    return _scan(request.headers, "x-request-id") if request is not None else None


def _remote_ip(info: Any) -> str | None:
    return info.client_ip or info.connection.remote_ip or None


def _remote_address(info: Any) -> str | None:
    client = info.client_ip  # inferred from x-forwarded-for: no port to tell
    if client:
        return f"[{client}]" if ":" in client else client
    return _direct_remote_address(info)


def _direct_remote_ip(info: Any) -> str | None:
    return info.connection.remote_ip or None


def _direct_remote_address(info: Any) -> str | None:
    conn = info.connection
    ip = conn.remote_ip
    if not ip:
        return None
    port = getattr(conn, "remote_port", 0)
    if ":" in ip:
        ip = f"[{ip}]"
    return f"{ip}:{port}" if port else ip


#: Request pseudo-headers: getter and its inline expression.
_PSEUDO_GETTERS: dict[str, tuple[Getter, str]] = {
    ":method": (lambda info: info.request.method if info.request is not None else None,
                "(_req.method if _req is not None else None)"),
    ":path": (lambda info: info.request.path if info.request is not None else None,
              "(_req.path if _req is not None else None)"),
    ":authority": (lambda info: (info.request.authority or None) if info.request is not None else None,
                   "((_req.authority or None) if _req is not None else None)"),
    ":scheme": (lambda info: info.request.scheme if info.request is not None else None,
                "(_req.scheme if _req is not None else None)"),
}


def _request_header_inline(name: str) -> str | None:
    """The inline expression of ``%REQ(name)%``."""
    if name in _PSEUDO_GETTERS:
        return _PSEUDO_GETTERS[name][1]
    if name == "x-request-id":
        return "(info.request_id or _request_id_header(_req))"
    if "'" in name:
        return None  # the getter is called instead
    return f"(_scan(_req.headers, '{name}') if _req is not None else None)"


def _request_header(name: str) -> Getter:
    if name in _PSEUDO_GETTERS:
        return _PSEUDO_GETTERS[name][0]
    if name == "x-request-id":
        return _request_id

    def get(info: Any) -> str | None:
        request = info.request
        return _scan(request.headers, name) if request is not None else None

    return get


def _response_header(name: str) -> Getter:
    if name == ":status":
        return lambda info: str(info.response.status) if info.response is not None else None

    def get(info: Any) -> str | None:
        response = info.response
        return _scan(response.headers, name) if response is not None else None

    return get


def _trailer(name: str) -> Getter:
    def get(info: Any) -> str | None:
        trailers = info.response_trailers
        return _scan(trailers, name) if trailers else None

    return get


# -- START_TIME ------------------------------------------------------------------

#: strftime directives accepted in %START_TIME(...)% besides %f, %1f..%9f, %s.
_STRFTIME_DIRECTIVES = set("aAbBcCdDeFgGhHIjmMnprRStTuUVwWxXyYzZ%")


#: Milliseconds as the end of the default %START_TIME%: "000Z" .. "999Z".
_MILLIS_Z = tuple(f"{ms:03d}Z" for ms in range(1000))
#: [whole second last rendered, its "%Y-%m-%dT%H:%M:%S.", wall - monotonic].
#: The clock offset is re-read when the second changes, so a line costs no
#: clock call for its start time (the stream's monotonic start is enough).
_clock: list[Any] = [-1, "", 0.0]


def _start_wall(start_time: float) -> tuple[float, int]:
    """(wall-clock start, its whole second), refreshing the cache on a new second."""
    clock = _clock
    wall = start_time + clock[2]
    sec = int(wall)
    if sec != clock[0]:
        clock[2] = _time() - _monotonic()
        wall = start_time + clock[2]
        sec = int(wall)
        clock[1] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        clock[0] = sec
    return wall, sec


def _compile_start_time(fmt: str, offset: int) -> Getter:
    """A getter for ``%START_TIME(fmt)%`` (UTC). Besides strftime's
    directives, Envoy's ``%f`` (nanoseconds), ``%1f``..``%9f`` (that many
    fractional digits) and ``%s`` (Unix seconds) are understood. The
    whole-second part is rendered once per second."""
    if not fmt:
        return _default_start_time
    # Pieces: ("t", strftime text) | ("f", digits) | ("s", "")
    pieces: list[tuple[str, Any]] = []
    text = ""
    i = 0
    while i < len(fmt):
        ch = fmt[i]
        if ch != "%":
            text += ch
            i += 1
            continue
        nxt = fmt[i + 1 : i + 2]
        if nxt.isdigit() and fmt[i + 2 : i + 3] == "f" and nxt != "0":
            pieces += [("t", text), ("f", int(nxt))]
            text, i = "", i + 3
        elif nxt == "f":
            pieces += [("t", text), ("f", 9)]
            text, i = "", i + 2
        elif nxt == "s":
            pieces += [("t", text), ("s", "")]
            text, i = "", i + 2
        elif nxt and nxt in _STRFTIME_DIRECTIVES:
            text += fmt[i : i + 2]
            i += 2
        else:
            token = fmt[i : i + 2] or "%"
            raise FormatSyntaxError(
                f"%START_TIME({fmt})%: unknown time directive {token!r} (strftime directives such as %Y %m %d "
                "%H %M %S %z, and %s, %f, %1f..%9f)", offset + len("%START_TIME(") + i, token,
            )
    pieces.append(("t", text))
    pieces = [p for p in pieces if p != ("t", "")]
    cache: list[Any] = [None, []]  # [second, rendered "t" pieces]

    def get(info: Any) -> str:
        wall, sec = _start_wall(info.start_time)
        if cache[0] != sec:
            tm = time.gmtime(sec)
            cache[1] = [time.strftime(p[1], tm) if p[0] == "t" else None for p in pieces]
            cache[0] = sec
        out = []
        for (kind, arg), rendered in zip(pieces, cache[1]):
            if kind == "t":
                out.append(rendered)
            elif kind == "f":
                out.append(f"{int((wall - sec) * 10 ** arg):0{arg}d}")
            else:
                out.append(str(sec))
        return "".join(out)

    return get


def _default_start_time(info: Any) -> str:
    """``%START_TIME%``: ``2024-05-01T12:00:00.123Z`` (UTC, milliseconds)."""
    return _default_start_time_of(info.start_time)


def _default_start_time_of(start_time: float) -> str:
    clock = _clock
    wall = start_time + clock[2]
    sec = int(wall)
    if sec != clock[0]:
        wall, sec = _start_wall(start_time)
    text = clock[1] + _MILLIS_Z[int((wall - sec) * 1000)]
    _last_ms[0] = int(wall * 1000)
    _last_ms[1] = text
    return text


#: [wall-clock millisecond, its %START_TIME%]: requests that start within
#: the same millisecond (many, under load) reuse the text.
_last_ms: list[Any] = [-1, ""]


# -- the operator table --------------------------------------------------------

#: name -> (getter, never_none, inline expression or None) for operators
#: without an argument.
_SIMPLE: dict[str, tuple[Getter, bool, str | None]] = {
    "PROTOCOL": (_protocol, False, "(_req.version if _req is not None else None)"),
    "RESPONSE_CODE": (_code, True, "(_resp.status if _resp is not None else 0)"),
    "RESPONSE_CODE_DETAILS": (_details, False, None),
    "RESPONSE_FLAGS": (_flags, False, "(_join(_f) if (_f := info.response_flags) else None)"),
    "BYTES_RECEIVED": (_bytes_received, True, "info.bytes_received"),
    "BYTES_SENT": (_bytes_sent, True, "info.bytes_sent"),
    "DURATION": (_duration, True, "int((_now - info.start_time) * 1000)"),
    "REQUEST_DURATION": (_request_duration, False, None),
    "RESPONSE_DURATION": (_response_duration, False, None),
    "RESPONSE_TX_DURATION": (_response_tx_duration, False, None),
    "UPSTREAM_HOST": (_upstream_host, False, "(info.upstream_host or None)"),
    "UPSTREAM_CLUSTER": (_upstream_cluster, False, "(info.upstream_cluster or None)"),
    "DOWNSTREAM_REMOTE_ADDRESS": (_remote_address, False, None),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (_remote_ip, False, None),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": (_direct_remote_address, False, None),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": (_direct_remote_ip, False, None),
    "ROUTE_NAME": (_route_name, False, None),
    "REQ_ID": (_request_id, False, "(info.request_id or _request_id_header(_req))"),
}
#: What inline expressions may use besides info, _req and _resp.
_INLINE_NAMES: dict[str, Any] = {
    "_join": ",".join, "_request_id_header": _request_id_header,
    "_clock": _clock, "_default_start_time_of": _default_start_time_of, "_last_ms": _last_ms,
    "_scan": _scan,
}
#: Operators that take a header argument: REQ(X?Y):N and friends.
_HEADER_OPS: dict[str, Callable[[str], Getter]] = {
    "REQ": _request_header,
    "RESP": _response_header,
    "TRAILER": _trailer,
}
OPERATORS: tuple[str, ...] = tuple(sorted([*_SIMPLE, *_HEADER_OPS, "START_TIME"]))


def _truncate(getter: Getter, limit: int) -> Getter:
    def get(info: Any) -> Any:
        value = getter(info)
        return value[:limit] if isinstance(value, str) else value

    return get


def _either(first: Getter, second: Getter) -> Getter:
    def get(info: Any) -> Any:
        value = first(info)
        return second(info) if value is None else value

    return get


def _header_arg(op: str, arg: str, offset: int, token: str) -> list[str]:
    names = [n.strip().lower() for n in arg.split("?")]
    if len(names) > 2:
        raise FormatSyntaxError(f"{token}: at most one alternative header (X?Y)", offset, token)
    pseudo = _PSEUDO_RESPONSE if op == "RESP" else _PSEUDO_REQUEST if op == "REQ" else ()
    for name in names:
        if not name or not _HEADER_NAME.fullmatch(name):
            raise FormatSyntaxError(f"{token}: {name!r} is not a header name", offset, token)
        if name.startswith(":") and name not in pseudo:
            allowed = f"one of {', '.join(pseudo)}" if pseudo else "none"
            raise FormatSyntaxError(f"{token}: unknown pseudo-header {name!r} (allowed: {allowed})", offset, token)
    return names


def _operator(match: re.Match[str], offset: int) -> Operator:
    token = match.group(0)
    name, arg, limit = match.group(1), match.group(2), match.group(3)
    known = name in _SIMPLE or name in _HEADER_OPS or name == "START_TIME"
    if not known:
        near = difflib.get_close_matches(name.upper(), OPERATORS, n=1, cutoff=0.6)
        hint = f"did you mean %{near[0]}%?" if near else f"known: {', '.join(OPERATORS)}"
        raise FormatSyntaxError(f"unknown command operator %{name}% ({hint})", offset, token)
    if limit == "" or (limit is not None and int(limit) == 0):
        raise FormatSyntaxError(f"{token}: the length limit after ':' must be a positive number", offset, token)
    if limit is not None and name not in _HEADER_OPS:
        raise FormatSyntaxError(f"{token}: only REQ, RESP and TRAILER take a length limit (:N)", offset, token)
    if name in _HEADER_OPS:
        if not arg:
            raise FormatSyntaxError(f"%{name}% needs a header name: %{name}(x-header)% or %{name}(x-a?x-b)%", offset, token)
        names = _header_arg(name, arg, offset, token)
        make = _HEADER_OPS[name]
        getter = make(names[0])
        inline = None
        if name == "REQ":
            inline = _request_header_inline(names[0])
        elif name == "RESP" and names[0] != ":status" and "'" not in names[0]:
            inline = f"(_scan(_resp.headers, '{names[0]}') if _resp is not None else None)"
        if len(names) == 2:
            getter = _either(getter, make(names[1]))
            second = _request_header_inline(names[1]) if name == "REQ" else None
            if inline is not None and second is not None:
                var = f"_a{offset}"
                inline = f"({var} if ({var} := {inline}) is not None else {second})"
            else:
                inline = None
        if limit is not None:
            getter = _truncate(getter, int(limit))
            inline = None
        return Operator(token, getter, inline=inline)
    if name == "START_TIME":
        inline = None if arg else (
            "(_last_ms[1] if int((info.start_time + _clock[2]) * 1000) == _last_ms[0] else _default_start_time_of(info.start_time))"
        )
        return Operator(token, _compile_start_time(arg or "", offset), never_none=True, inline=inline)
    if arg is not None:
        raise FormatSyntaxError(f"%{name}% takes no argument (got ({arg}))", offset, token)
    getter, never_none, inline = _SIMPLE[name]
    return Operator(token, getter, never_none, inline)


def parse_format(text: str) -> list[str | Operator]:
    """Split a format string into literal text and compiled operators.

    ``%%`` is a literal ``%``. Raises :class:`FormatSyntaxError` on an
    unknown operator, a bad argument, or a ``%`` that starts nothing.
    """
    parts: list[str | Operator] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find("%", i)
        if j < 0:
            literal.append(text[i:])
            break
        literal.append(text[i:j])
        if text.startswith("%%", j):
            literal.append("%")
            i = j + 2
            continue
        match = _OPERATOR.match(text, j)
        if match is None:
            start = _NAME_START.match(text, j)
            if start is None:
                shown = text[j : j + 10]
                raise FormatSyntaxError(
                    f"'%' at character {j + 1} starts no command operator ({shown!r}); operators look like "
                    "%NAME% or %NAME(arg)%, and %% is a literal %", j, shown,
                )
            raise FormatSyntaxError(
                f"command operator {start.group(0)} at character {j + 1} is not closed: expected "
                "%NAME%, %NAME(arg)% or %NAME(arg):N%", j, start.group(0),
            )
        if literal:
            joined = "".join(literal)
            if joined:
                parts.append(joined)
            literal = []
        parts.append(_operator(match, j))
        i = match.end()
    joined = "".join(literal)
    if joined:
        parts.append(joined)
    return parts


def check_format(value: object) -> bool:
    """The ``access_log_format`` JSON Schema format: raises
    :class:`FormatSyntaxError` for a string that is not a valid format."""
    if isinstance(value, str):
        parse_format(value)
    return True


def _wire_text(text: str) -> str:
    """Literal text as the latin-1 view of its UTF-8 bytes: log lines are
    written with ``encode('latin-1')``, so header values (latin-1 decoded
    wire bytes) and literals both come out as the right bytes."""
    try:
        text.encode("latin-1")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8").decode("latin-1")


def _fstring_literal(text: str) -> str:
    """``text`` escaped to sit between the quotes of a generated f"..."."""
    out = []
    for ch in text:
        if ch in "{}":
            out.append(ch * 2)
        elif ch in '\\"' or not (" " <= ch <= "~"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


_USES_REQ = re.compile(r"\b_req\b")


def _one_pass(body: str, message: str, prefix: str) -> tuple[str, str]:
    """When ``body`` looks up two or more headers of ``message`` (``_req`` or
    ``_resp``), replace the lookups with variables filled by one loop over
    its headers (a set test per header instead of a scan per lookup).
    Returns the new body and the loop's source."""
    lookup = re.compile(rf"\(_scan\({message}\.headers, '([^']*)'\) if {message} is not None else None\)")
    names = list(dict.fromkeys(lookup.findall(body)))
    if len(names) < 2:
        return body, ""
    var = {name: f"{prefix}{i}" for i, name in enumerate(names)}
    body = lookup.sub(lambda m: var[m.group(1)], body)
    lines = [f"    {' = '.join(var.values())} = None", f"    if {message} is not None:",
             f"        for _k, _v in {message}.headers:", f"            if _k in {set(names)!r}:"]
    for i, name in enumerate(names):
        lines.append(f"                {'if' if i == 0 else 'elif'} _k == '{name}':")
        lines.append(f"                    if {var[name]} is None: {var[name]} = _v")
    return body, "\n".join(lines) + "\n"

_USES_RESP = re.compile(r"\b_resp\b")
_INFO_ATTR = re.compile(r"\binfo\.([a-z_]+)")
_USES_NOW = re.compile(r"\b_now\b")


class DeferredFormat(NamedTuple):
    """A compiled format split in two, for loggers that render in batches.

    ``capture(info)`` runs when the stream ends and returns a tuple of what
    the format needs: references to existing objects (the request and
    response heads, counters, the end time), so it allocates one tuple and
    formats nothing. ``render(captures, append)`` later turns each captured
    tuple into its line, calling ``append(line)``; it runs over many lines
    in one loop, while its code and data are hot in the CPU caches.

    Rendering later reads the captured heads' headers then: the core never
    changes a request or response head after its stream has ended.
    """

    capture: Callable[[Any], tuple[Any, ...]]
    render: Callable[[Iterable[tuple[Any, ...]], Callable[[str], Any]], None]


class _CodeBuilder:
    """Generates the code of a compiled format: each operator as an
    expression over captured variables (``_req``, ``_resp``, ``_now``,
    ``_i_<attribute>`` and ``_c<n>`` for getters without an inline form),
    collecting what must be captured per stream and the namespace the code
    runs in."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"_D": "-", "_NULL": "null", "_esc": _json_string,
                                          "_monotonic": _monotonic, **_INLINE_NAMES}
        self.captured: dict[str, str] = {}
        self.attributes: dict[str, None] = {}  # of info, in order of use
        self.statements: list[str] = []  # computed before the line, per line
        self._count = 0

    def _number(self) -> int:
        self._count += 1
        return self._count

    def expression(self, part: Operator) -> str:
        if part.inline is not None:
            self.attributes.update(dict.fromkeys(_INFO_ATTR.findall(part.inline)))
            return _INFO_ATTR.sub(lambda m: f"_i_{m.group(1)}", part.inline)
        # Getters without an inline form run at capture time.
        n = self._number()
        self.namespace[f"_g{n}"] = part.getter
        self.captured[f"_c{n}"] = f"_g{n}(info)"
        return f"_c{n}"

    def text(self, parts: list[str | Operator]) -> str:
        """An f-string body: literal text, each value as text, "-" for missing."""
        body = []
        for part in parts:
            if isinstance(part, str):
                body.append(_fstring_literal(_wire_text(part)))
                continue
            expr = self.expression(part)
            if part.never_none:
                body.append(f"{{{expr}}}")
            else:
                n = self._number()
                body.append(f"{{_D if (_v{n} := {expr}) is None else _v{n}}}")
        return "".join(body)

    def json(self, value: Any, path: str) -> str:
        """An f-string body rendering one JSON value exactly as
        ``json.dumps(compile_json_format(...)(info), separators=(",", ":"))``."""
        if isinstance(value, dict):
            members = [_fstring_literal(_json_string(str(k)) + ":") + self.json(v, f"{path}.{k}") for k, v in value.items()]
            return "{{" + ",".join(members) + "}}"
        if isinstance(value, str):
            parts = parse_format(value)
            if len(parts) == 1 and isinstance(parts[0], Operator):  # typed: a number, a string or null
                n = self._number()
                expr = self.expression(parts[0])
                return f"{{_NULL if (_v{n} := {expr}) is None else _esc(_v{n}) if _v{n}.__class__ is str else _v{n}}}"
            if all(isinstance(p, str) for p in parts):
                return _fstring_literal(_json_string("".join(parts)))  # type: ignore[arg-type]
            n = self._number()
            self.statements.append(f'_t{n} = f"{self.text(parts)}"')
            return f"{{_esc(_t{n})}}"
        if value is None or isinstance(value, (bool, int, float)):
            return _fstring_literal(json.dumps(value))
        raise _bad_json_value(value, path)

    def finish(self, body: str) -> tuple[list[tuple[str, str]], list[str], str]:
        """(captures as ``(variable, expression over info)``, the statements
        each line runs first, the f-string body), once all code is built."""
        # Several headers of one message are found in one pass over it.
        separator = "\x00"
        code = separator.join([*self.statements, body])
        code, request_pass = _one_pass(code, "_req", "_rq")
        code, response_pass = _one_pass(code, "_resp", "_rs")
        *statements, body = code.split(separator)
        captured = self.captured
        if _USES_REQ.search(code) or request_pass:
            captured["_req"] = "info.request"
        if _USES_RESP.search(code) or response_pass:
            captured["_resp"] = "info.response"
        if _USES_NOW.search(code):
            captured["_now"] = "_monotonic()"
        for attr in self.attributes:
            captured[f"_i_{attr}"] = f"info.{attr}"
        prelude = (request_pass + response_pass).splitlines()
        return list(captured.items()), [line[4:] for line in prelude] + statements, body

    def define_format_line(self, body: str) -> Callable[[Any], str]:
        captured, statements, body = self.finish(body)
        lines = [f"{var} = {expr}" for var, expr in captured] + statements + [f'return f"{body}"']
        source = "def format_line(info):\n" + "".join(f"    {line}\n" for line in lines)
        return _define(source, self.namespace, "format_line")

    def define_deferred(self, body: str) -> DeferredFormat:
        captured, statements, body = self.finish(body)
        names = [var for var, _ in captured]
        values = ", ".join(expr for _, expr in captured)
        target = f"{', '.join(names)}," if names else "_"
        loop = "".join(f"        {line}\n" for line in [*statements, f'append(f"{body}")'])
        source = (
            f"def capture(info):\n    return ({values}{',' if len(names) == 1 else ''})\n"
            f"def render(captures, append):\n    for {target} in captures:\n{loop}"
        )
        capture = _define(source, self.namespace, "capture")
        return DeferredFormat(capture, self.namespace["render"])


#: A JSON string literal for ``text``, non-ASCII escaped (as json.dumps does).
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _define(source: str, namespace: dict[str, Any], name: str) -> Any:
    exec(compile(source, "<access log format>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace[name]


def compile_format(text: str | None = None) -> Callable[[Any], str]:
    """``info -> str`` for the format ``text`` (Envoy's default when
    ``None``). Missing values print ``-``.

    Compiled once, into one generated function that returns one f-string:
    literal text inline, each operator as its inline expression or a call
    of its getter. Per line that is a few attribute reads and calls, and no
    parsing, dict walk or list building.
    """
    builder = _CodeBuilder()
    fn = builder.define_format_line(builder.text(parse_format(DEFAULT_FORMAT if text is None else text)))
    fn.__doc__ = f"Formats {text if text is not None else DEFAULT_FORMAT!r}."
    return fn


def compile_deferred_format(text: str | None = None) -> DeferredFormat:
    """The format ``text`` as a :class:`DeferredFormat`: the same lines as
    :func:`compile_format`, captured per stream and rendered in batches."""
    builder = _CodeBuilder()
    return builder.define_deferred(builder.text(parse_format(DEFAULT_FORMAT if text is None else text)))


def compile_deferred_json_format(mapping: dict[str, Any]) -> DeferredFormat:
    """A ``json_format`` mapping as a :class:`DeferredFormat` rendering JSON
    lines (newline-terminated, compact, ASCII): the text of
    ``json.dumps(compile_json_format(mapping)(info), separators=(",", ":"))``,
    generated directly instead of through a dict and the encoder."""
    _check_json_mapping(mapping)
    builder = _CodeBuilder()
    return builder.define_deferred(builder.json(mapping, "") + "\\x0a")


def _bad_json_value(value: Any, path: str) -> ValueError:
    return ValueError(f"json_format{path}: expected a format string, a number, true/false or a mapping, got {type(value).__name__}")


def _check_json_mapping(mapping: Any) -> None:
    if not isinstance(mapping, dict):
        raise ValueError("json_format: expected a mapping of keys to format strings")


def _json_value(value: Any, path: str) -> Getter:
    if isinstance(value, dict):
        items = [(str(k), _json_value(v, f"{path}.{k}")) for k, v in value.items()]
        return lambda info: {k: g(info) for k, g in items}
    if isinstance(value, str):
        parts = parse_format(value)
        if len(parts) == 1 and isinstance(parts[0], Operator):
            return parts[0].getter  # typed: numbers stay numbers, missing is null
        if all(isinstance(p, str) for p in parts):
            constant = "".join(parts)  # type: ignore[arg-type]
            return lambda info: constant
        return compile_format(value)
    if value is None or isinstance(value, (bool, int, float)):
        return lambda info: value
    raise _bad_json_value(value, path)


def compile_json_format(mapping: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    """``info -> dict`` for a ``json_format`` mapping: each value a format
    string (one operator alone keeps its type: numbers are numbers, a missing
    value is ``null``; mixed with text it is a string), a nested mapping, or
    a constant."""
    _check_json_mapping(mapping)
    return _json_value(mapping, "")  # type: ignore[return-value]


# -- filters ---------------------------------------------------------------------

_HEALTH_CHECK_AGENTS = ("Envoy/HC",)


def is_health_check(info: Any) -> bool:
    """Marked by a filter (``stream.is_health_check = True``), or sent by an
    Envoy health checker (``user-agent: Envoy/HC``)."""
    if info.is_health_check:
        return True
    request = info.request
    agent = _scan(request.headers, "user-agent") if request is not None else None
    return agent is not None and agent.startswith(_HEALTH_CHECK_AGENTS)


def compile_filter(spec: dict[str, Any] | None) -> Callable[[Any], bool] | None:
    """The ``filter:`` of an access_log entry as one predicate (every
    condition given must hold), or ``None`` when it lets everything through."""
    if not spec:
        return None
    tests: list[Callable[[Any], bool]] = []
    status = spec.get("status_code")
    if status:
        ge, le, eq, ne = (status.get(k) for k in ("ge", "le", "eq", "ne"))
        lo = ge if ge is not None else -1
        hi = le if le is not None else 10**9

        def status_ok(info: Any) -> bool:
            response = info.response
            code = response.status if response is not None else 0
            return lo <= code <= hi and (eq is None or code == eq) and (ne is None or code != ne)

        tests.append(status_ok)
    duration = spec.get("duration")
    if duration:
        dge = _seconds(duration.get("ge"))
        dle = _seconds(duration.get("le"))
        dlo = dge if dge is not None else -1.0
        dhi = dle if dle is not None else float("inf")
        tests.append(lambda info: dlo <= _monotonic() - info.start_time <= dhi)
    if spec.get("not_health_check"):
        tests.append(lambda info: not is_health_check(info))
    header = spec.get("header")
    if header:
        matcher = HeaderMatcher(header)
        absent = matcher.test(None) != matcher.invert  # what a request without headers (TCP) gets
        tests.append(lambda info: matcher.matches(info.request) if info.request is not None else absent)
    sampling = spec.get("sampling")
    if sampling is not None and sampling < 100:
        if sampling <= 0:
            tests.append(lambda info: False)
        else:
            fraction = sampling / 100.0
            rand = random.random
            tests.append(lambda info: rand() < fraction)  # last: only what passed the rest is sampled
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]
    checks = tuple(tests)
    return lambda info: all(t(info) for t in checks)


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    from .config.units import parse_duration  # here: outrider.config imports this module

    return float(value) if isinstance(value, (int, float)) else parse_duration(value)


# -- the listener's access logs --------------------------------------------------

class AccessLogs:
    """A listener's ``access_log:`` entries, built once. :attr:`observe`
    (what the HTTP connection manager and listener protocols call with an
    :class:`AccessLogInfo`) runs each entry's filter and logger. A logger
    that raises costs a stat (``access_logs.log_error``) and a rate-limited
    log line, never the stream."""

    def __init__(self, entries: list[tuple[str, Callable[[Any], bool] | None, Any]], stats: Any) -> None:
        #: (extension name, filter or None, logger)
        self.entries = entries
        self.loggers = [logger for _, _, logger in entries]
        self._errors = stats.counter("access_logs.log_error")
        self._log_error = RateLimitedLog(log, 10.0)
        self.observe: Callable[[Any], None] = self._observer()

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __call__(self, info: Any) -> None:
        self.observe(info)

    def _observer(self) -> Callable[[Any], None]:
        failed = self._failed
        if len(self.entries) == 1 and self.entries[0][1] is None:
            # The common case, without a loop: one logger, no filter.
            name, _, logger = self.entries[0]
            write = logger.log

            def observe_one(info: Any) -> None:
                try:
                    write(info)
                except Exception as exc:  # a logger's bug must not fail the stream
                    failed(name, exc)

            return observe_one
        calls = tuple((accept, logger.log, name) for name, accept, logger in self.entries)

        def observe(info: Any) -> None:
            for accept, write, name in calls:
                try:
                    if accept is None or accept(info):
                        write(info)
                except Exception as exc:
                    failed(name, exc)

        return observe

    def _failed(self, name: str, exc: Exception) -> None:
        self._errors.value += 1
        self._log_error(logging.ERROR, "access logger %r raised: %r", name, exc)

    def reopen(self) -> None:
        for name, _, logger in self.entries:
            reopen = getattr(logger, "reopen", None)
            if reopen is not None:
                try:
                    reopen()
                except Exception as exc:
                    log.error("access logger %r: reopen failed: %r", name, exc)

    def close(self) -> None:
        for name, _, logger in self.entries:
            close = getattr(logger, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:
                    log.error("access logger %r: close failed: %r", name, exc)


def build_access_logs(refs: Iterable[dict[str, Any]], ctx: "BuildContext") -> AccessLogs:
    """Build a listener's ``access_log:`` list (normalised refs: ``{name,
    config, filter?}``)."""
    entries = []
    for ref in refs:
        logger = ctx.build("access_loggers", ref)
        if not callable(getattr(logger, "log", None)):
            raise TypeError(
                f"access_loggers extension {ref['name']!r}: its factory must return an object with "
                f"log(info) (got {type(logger).__name__})"
            )
        entries.append((ref["name"], compile_filter(ref.get("filter")), logger))
    return AccessLogs(entries, ctx.stats)
