#!/usr/bin/env python3
"""What one file access log costs: Outrider without and with one, in paired runs.

    python3 bench/access_log_cost.py                  # 12 B and 16 KiB, 8 rounds of 3 s each
    python3 bench/access_log_cost.py --sizes 12 --rounds 12 --log-path /tmp/access.log

Both proxies run side by side for the whole measurement (pinned to the same
CPU, one of them idle at a time) and wrk alternates between them, round by
round, in alternating order. This machine's speed drifts by up to 2x within
minutes, so only the ratio within a round means something: reported are the
medians, over the rounds, of the req/s ratio and of the difference in CPU
microseconds per request. The access log is a ``file`` logger in Envoy's
default format, as in issue #3's criterion ("no more than 10% drop").
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from run import cpu_seconds, free_port, run_wrk, start_nginx, start_outrider


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12, 16384], help="response body sizes in bytes")
    parser.add_argument("--rounds", type=int, default=8, help="measurements of each proxy per size (default 8)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement (default 3)")
    parser.add_argument("--connections", type=int, default=50, help="wrk keep-alive connections (default 50)")
    parser.add_argument("--log-path", default="/dev/null", help="where the access log writes (default /dev/null)")
    parser.add_argument("--proxy-cpus", default="0", help="CPUs the proxies are pinned to (default 0)")
    parser.add_argument("--client-cpus", default="1", help="CPUs of wrk and nginx (default 1)")
    args = parser.parse_args(argv)
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"bench needs {tool} (apt-get install {tool})")

    print("| body | without log req/s | with log req/s | req/s ratio (median, min-max) | extra CPU us/req (median) |")
    print("|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory(prefix="outrider-bench-") as tmp:
        workdir = Path(tmp)
        upstream_port = free_port()
        nginx = start_nginx(workdir, upstream_port, args.client_cpus, args.sizes)
        proxies = {}
        try:
            for variant, log_path in (("without", None), ("with", args.log_path)):
                (workdir / variant).mkdir()
                port = free_port()
                proc = start_outrider(workdir / variant, port, upstream_port, args.proxy_cpus, log_path)
                proxies[variant] = (proc, port)
            for size in args.sizes:
                samples: dict[str, list[tuple[float, float]]] = {variant: [] for variant in proxies}
                for variant, (_, port) in proxies.items():  # warm up pools and caches
                    run_wrk(f"http://127.0.0.1:{port}/{size}", 2, args.connections, args.client_cpus)
                for round_ in range(args.rounds):
                    order = list(proxies) if round_ % 2 == 0 else list(reversed(proxies))
                    for variant in order:
                        proc, port = proxies[variant]
                        before = cpu_seconds(proc.pid)
                        rps, _, total, _ = run_wrk(f"http://127.0.0.1:{port}/{size}", args.duration, args.connections, args.client_cpus)
                        samples[variant].append((rps, (cpu_seconds(proc.pid) - before) * 1e6 / max(total, 1)))
                pairs = list(zip(samples["without"], samples["with"]))
                ratios = [w[0] / wo[0] for wo, w in pairs]
                extra = [w[1] - wo[1] for wo, w in pairs]
                print(f"| {size} B | {statistics.median(r for r, _ in samples['without']):,.0f} "
                      f"| {statistics.median(r for r, _ in samples['with']):,.0f} "
                      f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
                      f"| {statistics.median(extra):+.1f} |", flush=True)
        finally:
            for proc, _ in proxies.values():
                proc.terminate()
                proc.wait(timeout=15)
            nginx.terminate()
            nginx.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
