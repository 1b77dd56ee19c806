"""Headers the connection manager adds or keeps on the way upstream, through
the real proxy: x-forwarded-for / x-forwarded-proto (with and without
``use_remote_address``) and x-request-id (core/http/conn_manager.py,
``ActiveStream.decode_headers`` and ``_write``).

Requests are written on raw sockets so that a header can be sent twice, as
two lines; the echo upstream reports every line it received.
"""

from __future__ import annotations

import json
import re

import pytest

from support import ProxyRunner, echo_app, free_port, raw_exchange, start_aiohttp

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def listeners(tmp_path_factory):
    """One proxy for the module (these tests only read what it forwards),
    three listeners to one echo upstream: ``edge`` (use_remote_address),
    ``inner`` (the defaults) and ``no_id`` (generate_request_id: false)."""
    server, up_port = start_aiohttp(echo_app("up"))
    proxy = ProxyRunner(tmp_path_factory.mktemp("forwarded"))
    ports = {name: free_port() for name in ("edge", "inner", "no_id")}
    options = {"edge": "use_remote_address: true", "inner": "", "no_id": "generate_request_id: false"}
    listeners = "".join(f"""
  - name: {name}
    address: 127.0.0.1:{ports[name]}
    http:
      stat_prefix: {name}
      {options[name]}
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: up}}""" for name in ports)
    proxy.start(f"""
listeners:{listeners}
clusters:
  - {{name: up, endpoints: ["127.0.0.1:{up_port}"]}}
""")
    yield ports
    proxy.stop_all()
    server.stop()


def exchange(port: int, *header_lines: str) -> tuple[int, list[tuple[str, str]], dict]:
    """GET / with ``header_lines`` on a fresh connection; returns the status,
    the response header lines and what the upstream saw (the echoed record)."""
    head = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + "".join(f"{h}\r\n" for h in header_lines) + "\r\n"
    raw = raw_exchange(port, head.encode("latin-1"))
    resp_head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = resp_head.decode("latin-1").split("\r\n")
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    return int(status_line.split()[1]), headers, json.loads(body)


def values(headers: list, name: str) -> list[str]:
    return [v for k, v in headers if k == name]


# ------------------------------------------------------------ x-forwarded-for


@pytest.mark.parametrize(
    "incoming, upstream_sees",
    [
        ((), ["127.0.0.1"]),
        (("X-Forwarded-For: 10.0.0.1",), ["10.0.0.1, 127.0.0.1"]),
        # Two lines are one list (RFC 9110 5.3): one line upstream, every hop kept.
        (("X-Forwarded-For: 1.1.1.1", "X-Forwarded-For: 2.2.2.2"), ["1.1.1.1, 2.2.2.2, 127.0.0.1"]),
    ],
    ids=["none", "one-line", "two-lines"],
)
def test_use_remote_address_appends_the_peer_to_x_forwarded_for(listeners, incoming, upstream_sees):
    status, _, seen = exchange(listeners["edge"], *incoming)
    assert status == 200
    assert values(seen["headers"], "x-forwarded-for") == upstream_sees
    assert values(seen["headers"], "x-forwarded-proto") == ["http"]


def test_use_remote_address_overwrites_a_client_x_forwarded_proto(listeners):
    # An edge proxy knows the scheme it received: a client's claim is replaced.
    status, _, seen = exchange(listeners["edge"], "X-Forwarded-Proto: https", "X-Forwarded-Proto: ftp")
    assert status == 200
    assert values(seen["headers"], "x-forwarded-proto") == ["http"]


def test_without_use_remote_address_forwarded_headers_are_trusted_as_sent(listeners):
    # Not the edge: x-forwarded-for passes untouched (nothing appended, lines
    # not joined); x-forwarded-proto is added only when the client sent none.
    status, _, seen = exchange(listeners["inner"], "X-Forwarded-For: 1.1.1.1", "X-Forwarded-For: 2.2.2.2")
    assert status == 200
    assert values(seen["headers"], "x-forwarded-for") == ["1.1.1.1", "2.2.2.2"]
    assert values(seen["headers"], "x-forwarded-proto") == ["http"]

    status, _, seen = exchange(listeners["inner"], "X-Forwarded-Proto: https")
    assert status == 200
    assert values(seen["headers"], "x-forwarded-for") == []
    assert values(seen["headers"], "x-forwarded-proto") == ["https"]


# --------------------------------------------------------------- x-request-id


def test_incoming_request_id_is_kept_and_echoed(listeners):
    status, headers, seen = exchange(listeners["inner"], "X-Request-Id: client-id-42")
    assert status == 200
    assert values(seen["headers"], "x-request-id") == ["client-id-42"]
    # Unlike Envoy (only with always_set_request_id_in_response), the id is
    # always echoed to the client (ActiveStream._write).
    assert values(headers, "x-request-id") == ["client-id-42"]


def test_missing_request_id_is_generated_forwarded_and_echoed(listeners):
    ids = []
    for _ in range(2):
        status, headers, seen = exchange(listeners["inner"])
        assert status == 200
        (sent,) = values(seen["headers"], "x-request-id")
        assert UUID4.match(sent), sent
        assert values(headers, "x-request-id") == [sent]
        ids.append(sent)
    assert ids[0] != ids[1]


def test_generate_request_id_false_adds_none_and_forwards_the_clients(listeners):
    status, headers, seen = exchange(listeners["no_id"])
    assert status == 200
    assert values(seen["headers"], "x-request-id") == []
    assert values(headers, "x-request-id") == []

    status, headers, seen = exchange(listeners["no_id"], "X-Request-Id: client-id-7")
    assert status == 200
    assert values(seen["headers"], "x-request-id") == ["client-id-7"]
