"""Durations, addresses and URLs, as written in an Outrider configuration.

The parsers raise ``ValueError`` with a message that says what was
expected; the config validator shows that message next to the offending
node, and extensions call the same functions on their own config values.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse

DURATION_HINT = "a duration like 250ms, 5s, 1m, 1h (a bare number means seconds)"
ADDRESS_HINT = "an address like 127.0.0.1:8080, example.com:443 or [::1]:8080"
HTTP_URL_HINT = "an http:// or https:// URL with a host, like http://127.0.0.1:9411/api/v2/spans"

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# One non-negative decimal number and one unit, nothing else: "5 s", "-1s",
# "1m30s" are rejected so that a typo can't silently mean something else.
_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)?")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: ``"250ms"`` → 0.25, ``"5s"``, ``"1m"``, ``"1h"``,
    ``"1.5s"``; a bare number (or numeric string) is seconds."""
    if isinstance(value, bool):  # bool is an int; `timeout: true` is a mistake
        raise ValueError(f"expected {DURATION_HINT}, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected {DURATION_HINT}, got {value!r} (durations are finite and not negative)")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {DURATION_HINT}, got {type(value).__name__}")
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(f"expected {DURATION_HINT}, got {value!r}")
    number, unit = match.groups()
    return float(number) * _UNIT_SECONDS[unit or "s"]


def parse_address(value: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; IPv6 hosts are bracketed:
    ``"[::1]:9901"`` → ``("::1", 9901)``. Port 0 (pick any) is allowed."""
    if not isinstance(value, str):
        raise ValueError(f"expected {ADDRESS_HINT}, got {type(value).__name__}")

    def bad(why: str) -> ValueError:
        return ValueError(f"expected {ADDRESS_HINT}, got {value!r} ({why})")

    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise bad("no port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise bad("an IPv6 host must be written in brackets, as [::1]:port")
    elif not host:
        raise bad("no host; use 0.0.0.0 for every interface")
    elif not _HOSTNAME.fullmatch(host):
        raise bad(f"{host!r} is not a host name or IP address")
    if not port_text.isascii() or not port_text.isdigit():
        raise bad(f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise bad(f"port {port} is out of range 0-65535")
    return host, port


def parse_http_url(value: str) -> urllib.parse.SplitResult:
    """An ``http://`` or ``https://`` URL with a host (a collector's, say),
    split into its parts."""
    if not isinstance(value, str):
        raise ValueError(f"expected {HTTP_URL_HINT}, got {type(value).__name__}")
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"expected {HTTP_URL_HINT}, got {value!r} ({exc})") from None
    # urlsplit accepts nearly anything ("not a url" is a relative path).
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected {HTTP_URL_HINT}, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"expected {HTTP_URL_HINT}, got {value!r} (no host)")
    if not value.isprintable() or " " in value:
        raise ValueError(f"expected {HTTP_URL_HINT}, got {value!r} (spaces or control characters)")
    return parts
