"""Active-active router replicas in the virtual-time cluster: one replica vs three, same engines.

    .venv/bin/python -P bench/router_replicas.py [--replicas 1 3] [--poll 0.25] [--jobs 2]

Each run routes one workload over 8 × h100-llama3-8b (KV block 64) with DualMap and a 5 s TTFT
SLO, at 70% of DualMap's recorded effective capacity on it (bench/results/routing_quality.md).
With N replicas, every request goes to one at random (as a Service spreads connections), each
replica has its own policy, its own in-flight counts and, every `--poll` seconds, the engines'
own running/waiting/KV usage (router/engine_load.py), exactly as the live router scrapes them.
The one-replica row runs through the same polling path; "exact" is the earlier single router
that sees every engine step; `--kv-events` adds each variant with the replicas following the
engines' KV events (what `kvEvents` gives a router in front of vLLM: every replica knows what every
engine caches, not only what it sent itself). Reports engine-side cache hit rate and SLO attainment per row.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from kvpilot.sim.cluster import Cluster, ClusterConfig
from kvpilot.sim.families import make_workload

# (workload, seed, requests, DualMap's effective capacity at SLO 5 s in req/s, where it was measured)
CASES: list[tuple[str, int, int, float]] = [
    ("mooncake", 0, 3000, 7.51),     # slice #0-2999: routing_quality.md, first table
    ("mooncake", 1, 3000, 8.68),     # slice #3000-5999: routing_quality.md, held-out slice
    ("agentic", 0, 4000, 126.0),     # ≥ the agentic service bound (126.4): routing_quality.md
    ("agentic", 1, 4000, 126.0),
]


def run(workload: str, seed: int, requests: int, rate: float, replicas: int, poll: float | None,
        kv_events: bool = False) -> dict[str, Any]:
    specs = make_workload(workload, requests, rate, seed)
    cfg = ClusterConfig(instances=8, policy="dualmap", block_size=64, slo_ttft_s=5.0, seed=seed,
                        replicas=replicas, poll_s=poll, kv_events=kv_events)
    t0 = time.perf_counter()
    s = Cluster(cfg).run(specs).summary
    return {"workload": workload, "seed": seed, "rate": rate, "replicas": replicas, "poll": poll, "kv": kv_events,
            "hit": s["cache_hit_rate"], "attainment": s["slo_attainment"], "ttft_p90": s["ttft_p90_s"],
            "imbalance": s["load_imbalance"], "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--poll", type=float, default=0.25)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the recorded capacity")
    parser.add_argument("--workloads", nargs="*", default=["mooncake", "agentic"])
    parser.add_argument("--exact", action="store_true", help="also the single router with an every-step view")
    parser.add_argument("--kv-events", action="store_true",
                        help="also every variant with the router following the engines' KV events (kvEvents)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = []
    for workload, seed, n, cap in CASES:
        if workload not in args.workloads:
            continue
        variants: list[tuple[int, float | None]] = [(r, args.poll) for r in args.replicas]
        if args.exact:
            variants.insert(0, (1, None))
        jobs += [(workload, seed, n, args.load * cap, r, p, False) for r, p in variants]
        if args.kv_events:
            jobs += [(workload, seed, n, args.load * cap, r, p, True) for r, p in variants if p is not None]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, *zip(*jobs, strict=True)))
    print("| workload | seed | rate (req/s) | router | hit rate | SLO attainment | TTFT p90 (s) | imbalance |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        router = "1, exact view" if r["poll"] is None else f"{r['replicas']} × poll {r['poll'] * 1000:.0f} ms"
        router += " + KV events" if r["kv"] else ""
        print(f"| {r['workload']} | {r['seed']} | {r['rate']:.2f} | {router} | {r['hit']:.2%} | "
              f"{r['attainment']:.1%} | {r['ttft_p90']:.2f} | {r['imbalance']:.2f} |")


if __name__ == "__main__":
    main()
