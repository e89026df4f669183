"""Latency the router adds: the same open-loop streaming load sent directly to a worker and
through `kvpilot router`, compared by TTFT percentiles at the client.

    .venv/bin/python -P bench/router_overhead.py [--rates 200 1000] [--seconds 10] [--policy dualmap]

One `kvpilot sim serve` worker (h100-qwen2.5-0.5b, so the modelled GPU is never the limit), one
router process in front of it, the load generator in this process: all three share the 2 cores,
so at high rates the numbers include CPU contention between them. Requests: 128-token prompts,
16 streamed tokens. `--workers N` runs the router as N processes sharing its port. Results:
bench/results/router_overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

from kvpilot.procs import free_ports
from kvpilot.sim.cluster import percentile
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker

sys.path.insert(0, str(Path(__file__).parent))
from sim_server_rps import drive


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 1000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--policy", default="dualmap")
    parser.add_argument("--no-hold", action="store_true", help="DualMap without its router-side queues")
    parser.add_argument("--workers", type=int, default=1, help="router processes sharing the port (--workers)")
    args = parser.parse_args()
    worker = SimWorker("--profile", "h100-qwen2.5-0.5b")
    extra = {} if args.workers == 1 else {"workers": args.workers, "workerPorts": free_ports(args.workers)}
    router = RouterProcess([{"name": "sim-model", "policy": args.policy, "holdRequests": not args.no_hold,
                             "endpoints": [{"name": "w0", "url": worker.url}]}], maxRetries=0, **extra)
    if args.workers > 1:
        time.sleep(3)   # the other processes bind the port a moment after the first answers /health
    try:
        print("| offered req/s | path | completed | answers | TTFT p50 ms | TTFT p99 ms | added p50 ms "
              "| added p99 ms |")
        print("|---:|---|---:|---|---:|---:|---:|---:|")
        for rate in args.rates:
            results = {}
            for path, url in (("direct", worker.url), ("router", router.url)):
                statuses: Counter[str] = Counter()
                done, _errors, _wall, ttfts = asyncio.run(drive(url, rate, args.seconds, "sim-model", statuses))
                results[path] = (percentile(ttfts, 50) * 1e3, percentile(ttfts, 99) * 1e3)
                added = ("", "") if path == "direct" else (
                    f"{results['router'][0] - results['direct'][0]:.1f}",
                    f"{results['router'][1] - results['direct'][1]:.1f}")
                answers = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
                print(f"| {rate:.0f} | {path} | {done}/{int(rate * args.seconds)} | {answers} | "
                      f"{results[path][0]:.1f} | {results[path][1]:.1f} | {added[0]} | {added[1]} |", flush=True)
    finally:
        router.stop()
        worker.stop()


if __name__ == "__main__":
    main()
