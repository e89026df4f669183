"""Virtual-time simulator speed: wall time to simulate a workload on N instances.

    .venv/bin/python -P bench/sim_speed.py [--instances 8 64 1000] [--requests-per-instance 100]

Synthetic multi-tenant chat workload (seeded), offered at 1 request/s per instance, routed
round-robin, Llama-3.1-8B/H100 profile, KV block size 16 (the profile's). Goal: ≥ 100k requests on
1,000 instances in under 5 minutes on a 2-core machine. Results: bench/results/sim_speed.md.
"""

from __future__ import annotations

import argparse
import platform
import time

from kvpilot.sim.cluster import Cluster, ClusterConfig
from kvpilot.sim.workload import SyntheticConfig, synthetic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, nargs="+", default=[8, 64, 1000])
    parser.add_argument("--requests-per-instance", type=int, default=100)
    parser.add_argument("--min-requests", type=int, default=20_000)
    parser.add_argument("--profile", default="h100-llama3-8b")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {platform.machine()}, profile {args.profile}")
    print("| instances | requests | simulated s | wall s | requests/wall s | engine events | SLO att. (TTFT 5 s)"
          " | TTFT p50 s | hit rate |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.instances:
        requests = max(args.min_requests, n * args.requests_per_instance)
        t0 = time.perf_counter()
        specs = synthetic(SyntheticConfig(requests=requests, rate=1.0 * n, tenants=max(8, n // 4), seed=n))
        gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = Cluster(ClusterConfig(instances=n, profile=args.profile)).run(specs)
        wall = time.perf_counter() - t0
        s = report.summary
        print(f"| {n} | {requests} | {report.makespan_s:.0f} | {wall:.1f} (+{gen:.1f} workload) | "
              f"{requests / wall:,.0f} | {report.events:,} | {s['slo_attainment']:.1%} | {s['ttft_p50_s']:.3f} | "
              f"{s['cache_hit_rate']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
