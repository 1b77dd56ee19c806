"""503 "no healthy upstream" (response flag ``UH``,
``cluster.<name>.upstream_cx_none_healthy``) through the real proxy.

No config can take a host out today (health checks and outlier detection are
refused at startup), so the only way to reach this path is a load balancer
whose ``choose`` returns ``None``. The test installs a tiny third-party
``load_balancers`` extension the way pip lays one out — a package plus a
``*.dist-info`` folder whose ``entry_points.txt`` names it in the
``outrider`` group — in a temporary directory put on the proxy's
``PYTHONPATH``. Discovery (``importlib.metadata`` entry points) is the same
as for a pip install; there is no build or venv to pay for.
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import time
from pathlib import Path

import aiohttp

from support import free_port

LB_MODULE = "outrider_test_picky_lb"

LB_SOURCE = '''\
"""picky: the first host, except for requests that carry x-no-host: none."""

from outrider import Extension, hookimpl


class PickyLoadBalancer:
    def __init__(self, hosts):
        self.hosts = list(hosts)

    def hosts_changed(self, hosts):
        self.hosts = list(hosts)

    def choose(self, context=None):
        if context is not None and context.headers.has("x-no-host"):
            return None
        return self.hosts[0] if self.hosts else None


def create(config, ctx=None, hosts=()):
    return PickyLoadBalancer(hosts)


@hookimpl
def outrider_register(registry):
    registry.add(Extension.from_module(
        __name__, name="picky", category="load_balancers", factory=create,
        status="wip", description="Test only: no host for requests with x-no-host.",
    ))
'''


def install_picky_lb(site: Path) -> dict[str, str]:
    """Lay the ``picky`` extension out in ``site``; returns the env for the proxy."""
    pkg = site / LB_MODULE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(LB_SOURCE)
    (pkg / "schema.json").write_text(json.dumps({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object", "additionalProperties": False, "properties": {},
    }))
    (pkg / "README.md").write_text("# picky\n\nTest only: no host for requests with `x-no-host`.\n")
    info = site / "outrider_test_picky_lb-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: outrider-test-picky-lb\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[outrider]\npicky = {LB_MODULE}\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def test_load_balancer_without_a_host_gives_503_uh(proxy, upstream, tmp_path):
    up_port, up_app = upstream
    env = install_picky_lb(tmp_path / "site")
    log_path = tmp_path / "access.log"
    port = free_port()
    proc = proxy.start(f"""
listeners:
  - name: web
    address: 127.0.0.1:{port}
    access_log:
      - name: file
        config:
          path: {log_path}
          format: "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %UPSTREAM_CLUSTER%\\n"
          flush_interval: 0.02s
    http:
      stat_prefix: web
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: picky_cluster}}
clusters:
  - name: picky_cluster
    lb_policy: picky
    endpoints: ["127.0.0.1:{up_port}"]
""", env=env)

    async def main():
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/x"
            async with session.get(url, headers={"x-no-host": "1"}) as resp:
                refused = resp.status, await resp.read()
            async with session.get(url) as resp:
                served = resp.status, await resp.json()
            return refused, served

    (status, body), (ok_status, seen) = asyncio.run(main())
    assert (status, body) == (503, b"no healthy upstream\n")
    # The same cluster serves when the balancer does return a host.
    assert ok_status == 200 and seen["path"] == "/x"
    assert len(up_app["requests"]) == 1  # the refused request never left the proxy

    assert proc.wait_stat("http.web.downstream_rq_2xx", 1) == 1
    assert proc.stat("cluster.picky_cluster.upstream_cx_none_healthy") == 1
    assert proc.stat("cluster.picky_cluster.upstream_rq_total") == 1
    assert proc.stat("http.web.downstream_rq_5xx") == 1

    deadline = time.monotonic() + 5
    lines: list[str] = []
    while len(lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
        lines = log_path.read_text().splitlines() if log_path.exists() else []
    assert lines == [
        "503 UH no_healthy_upstream picky_cluster",
        "200 - via_upstream picky_cluster",
    ], textwrap.indent(proc.output()[-2000:], "  ")
