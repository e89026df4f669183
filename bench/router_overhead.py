"""Latency the router adds: the same open-loop streaming load sent directly to a worker and
through `kvpilot router`, compared by TTFT percentiles at the client.

    .venv/bin/python -P bench/router_overhead.py [--rates 200 1000] [--seconds 10] [--policy dualmap]

One `kvpilot sim serve` worker (h100-qwen2.5-0.5b, so the modelled GPU is never the limit), one
router process in front of it, the load generator in this process: all three share the 2 cores,
so at high rates the numbers include CPU contention between them. Requests: 128-token prompts,
16 streamed tokens. `--workers N` runs the router as N processes sharing its port; `--peer
vllm:round_robin` adds a peer router (PyPI, scripts/peers-env.sh) in front of the same worker in
the same run. Results:
bench/results/router_overhead.md.

Each row also says what a request costs each process in CPU time (utime + stime from /proc, so it
holds under load): the load generator, the router's process group and the worker. With all three on
one machine of C cores, no number of router processes serves more than C ÷ (client + router +
worker) CPU seconds per request; one router process serves at most 1 ÷ router. The ratio of the two
bounds how much a second router process can add here (the `≤ scale` column), whatever the router's design.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

from kvpilot.procs import free_ports
from kvpilot.sim.cluster import percentile
from kvpilot.testing.peers import PeerRouter, group_cpu_seconds
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker

sys.path.insert(0, str(Path(__file__).parent))
from sim_server_rps import drive


def client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 1000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--policy", default="dualmap")
    parser.add_argument("--no-hold", action="store_true", help="DualMap without its router-side queues")
    parser.add_argument("--workers", type=int, default=1, help="router processes sharing the port (--workers)")
    parser.add_argument("--peer", action="append", default=[], metavar="KIND:POLICY",
                        help="also a peer router in the same run, e.g. vllm:round_robin (scripts/peers-env.sh)")
    args = parser.parse_args()
    worker = SimWorker("--profile", "h100-qwen2.5-0.5b")
    extra = {} if args.workers == 1 else {"workers": args.workers, "workerPorts": free_ports(args.workers)}
    router = RouterProcess([{"name": "sim-model", "policy": args.policy, "holdRequests": not args.no_hold,
                             "endpoints": [{"name": "w0", "url": worker.url}]}], maxRetries=0, **extra)
    peers: list[PeerRouter] = []
    if args.workers > 1:
        time.sleep(3)   # the other processes bind the port a moment after the first answers /health
    try:
        for spec in args.peer:
            kind, _, policy = spec.partition(":")
            peers.append(PeerRouter(kind, policy or "round_robin", [worker.url]))
        paths = [("direct", worker.url, worker.proc.pid), ("router", router.url, router.proc.pid)]
        paths += [(f"{p.kind}-router {p.policy}", p.url, p.pid) for p in peers]
        print("| offered req/s | path | completed | answers | TTFT p50 ms | TTFT p99 ms | added p50 ms "
              "| added p99 ms | CPU ms/req client | router | worker | ≤ scale |")
        print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        cores = os.cpu_count() or 1
        for rate in args.rates:
            results = {}
            for path, url, pid in paths:
                statuses: Counter[str] = Counter()
                before = (client_cpu_s(), group_cpu_seconds(pid), group_cpu_seconds(worker.proc.pid))
                done, _errors, _wall, ttfts = asyncio.run(drive(url, rate, args.seconds, "sim-model", statuses))
                after = (client_cpu_s(), group_cpu_seconds(pid), group_cpu_seconds(worker.proc.pid))
                c_client, c_router, c_worker = ((b - a) * 1e3 / max(1, done)
                                                for a, b in zip(before, after, strict=True))
                if path == "direct":
                    cpu = f"{c_client:.2f} | | {c_worker:.2f} |"
                else:   # all cores for client + router + worker, against one core for one router process
                    scale = cores * c_router / max(1e-9, c_client + c_router + c_worker)
                    cpu = f"{c_client:.2f} | {c_router:.2f} | {c_worker:.2f} | " + (
                        f"{scale:.2f}" if path == "router" else "")   # a peer's threads are not one process
                results[path] = (percentile(ttfts, 50) * 1e3, percentile(ttfts, 99) * 1e3)
                added = ("", "") if path == "direct" else (
                    f"{results[path][0] - results['direct'][0]:.1f}",
                    f"{results[path][1] - results['direct'][1]:.1f}")
                answers = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
                print(f"| {rate:.0f} | {path} | {done}/{int(rate * args.seconds)} | {answers} | "
                      f"{results[path][0]:.1f} | {results[path][1]:.1f} | {added[0]} | {added[1]} | {cpu} |",
                      flush=True)
    finally:
        for peer in peers:
            peer.stop()
        router.stop()
        worker.stop()


if __name__ == "__main__":
    main()
