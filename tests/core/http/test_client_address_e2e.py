"""The client address the proxy infers from x-forwarded-for
(``xff_num_trusted_hops``, as Envoy reads it), seen in access logs:
%DOWNSTREAM_REMOTE_ADDRESS% is the inferred client, the DIRECT operators
the connection's peer."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from support import ProxyRunner, free_port

FORMAT = "%REQ(:PATH)%|%DOWNSTREAM_REMOTE_ADDRESS%|%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%|%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%\\n"


def listener(name: str, port: int, path: Path, settings: str) -> str:
    return f"""
  - name: {name}
    address: 127.0.0.1:{port}
    http:
      stat_prefix: {name}
      {settings}
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              direct_response: {{status: 200, body: "ok"}}
    access_log:
      - name: file
        config: {{path: "{path}", flush_interval: 10ms, format: "{FORMAT}"}}
"""


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client_address")
    runner = ProxyRunner(tmp)
    ports = {name: free_port() for name in ("plain", "trust1", "remote1")}
    logs = {name: tmp / f"{name}.log" for name in ports}
    config = "listeners:" + "".join((
        listener("plain", ports["plain"], logs["plain"], "use_remote_address: false"),
        listener("trust1", ports["trust1"], logs["trust1"], "xff_num_trusted_hops: 1"),
        listener("remote1", ports["remote1"], logs["remote1"], "use_remote_address: true\n      xff_num_trusted_hops: 1"),
    ))
    runner.start(config)
    yield ports, logs
    runner.stop_all()


def logged(ports: dict, logs: dict, name: str, path: str, xff: list[str]) -> list[str]:
    head = f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n" + "".join(f"X-Forwarded-For: {v}\r\n" for v in xff)
    with socket.create_connection(("127.0.0.1", ports[name]), timeout=5) as sock:
        sock.sendall(head.encode() + b"\r\n")
        while sock.recv(65536):
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if logs[name].exists():
            for line in logs[name].read_text().splitlines():
                if line.startswith(path + "|"):
                    return line.split("|")[1:]
        time.sleep(0.02)
    raise AssertionError(f"no line for {path} in {logs[name]}")


@pytest.mark.parametrize(
    "name, xff, client",
    [
        # Not trusting any hop: the last address is the client.
        ("plain", ["203.0.113.7"], "203.0.113.7"),
        ("plain", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),
        # One trusted proxy in front: the second from the right; too few
        # addresses, or not an address there: the peer is the client.
        ("trust1", ["198.51.100.1, 203.0.113.7"], "198.51.100.1"),
        ("trust1", ["198.51.100.1", "203.0.113.7"], "198.51.100.1"),
        ("trust1", ["203.0.113.7"], None),
        ("trust1", ["garbage, 203.0.113.7"], None),
        ("trust1", ["2001:db8::1, 203.0.113.7"], "2001:db8::1"),
        # use_remote_address appends the peer first: one trusted hop is then
        # the last address the client sent.
        ("remote1", ["203.0.113.7"], "203.0.113.7"),
        ("remote1", [], None),
        ("plain", [], None),
    ],
)
def test_the_client_address_from_x_forwarded_for(proxied, name, xff, client):
    ports, logs = proxied
    path = f"/{name}/{abs(hash((name, tuple(xff))))}"
    address, address_without_port, direct = logged(ports, logs, name, path, xff)
    assert direct == "127.0.0.1"  # the connection's peer, always
    if client is None:
        assert address_without_port == "127.0.0.1"
        host, _, port = address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
    else:
        assert address_without_port == client
        assert address == (f"[{client}]" if ":" in client else client)  # no port to tell
