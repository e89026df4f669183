"""Cross-instance prefix sharing vs affinity alone, in the virtual-time cluster.

    .venv/bin/python -P bench/prefix_sharing.py [--requests 3000] [--slo 2] [--costs 0.25] [--jobs 2]

With vLLM engines on kvpilot's Redis store, any instance can load a prefix another computed.
DualMap already sends a request to its second candidate when the first's predicted TTFT passes
θ × SLO, and lets idle instances take held requests (`HoldQueues` steal); the option
(`PolicyContext.shared_store`, router config `sharePrefixes`) makes its cost model count a
stored prefix at a non-owner as a load (`store_token_cost` of a prefill per token) instead of a
prefill, so those moves are taken when they pay. Variants, DualMap throughout, on the Mooncake
trace (as bench/routing_quality.py: 8 × h100-llama3-8b, block 64):

- `no store`: engines see only their own prefix caches (the simulator's default);
- `store, affinity alone`: the engines load stored prefixes, the router does not know;
- `store, sharing`: the router's cost model knows (the option).

The store is unbounded (Redis sized for the working set) and a prompt's blocks are in it once
its prefill is done. A load is modelled as `store_token_cost` of the loaded tokens computed.
Writes a Markdown table to stdout and JSON to bench/out/prefix_sharing.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from kvpilot.sim.cluster import Cluster, ClusterConfig

sys.path.insert(0, str(Path(__file__).parent))   # bench/ is not a package; -P keeps it off the path
from routing_quality import effective_capacity, trace

VARIANTS = {"no store": (False, False), "store, affinity alone": (True, False), "store, sharing": (True, True)}


def curve(variant: str, cost: float, slo: float, args: argparse.Namespace, base_rate: float) -> list[dict[str, Any]]:
    store, share = VARIANTS[variant]
    out = []
    for s in args.speedups:
        cfg = ClusterConfig(instances=args.instances, profile=args.profile, policy="dualmap",
                            block_size=args.block_size, slo_ttft_s=slo, shared_store=store, route_by_store=share,
                            store_token_cost=cost)
        cluster = Cluster(cfg)
        summary = cluster.run(trace(args.skip, args.requests, s)).summary
        loaded = sum(e.counters.prompt_tokens_external for e in cluster.engines)
        prompt = sum(e.counters.prompt_tokens for e in cluster.engines)
        out.append({"rate": base_rate * s, **summary, "store_share": loaded / prompt if prompt else 0.0})
        if summary["slo_attainment"] < 0.5:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--slo", type=float, nargs="+", default=[2.0])
    parser.add_argument("--costs", type=float, nargs="+", default=[0.25])
    parser.add_argument("--speedups", type=float, nargs="+",
                        default=[1.0, 1.5, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 4.5, 5.0])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--profile", default="h100-llama3-8b")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/out/prefix_sharing.json"))
    args = parser.parse_args()
    base = trace(args.skip, args.requests, 1.0)
    base_rate = len(base) / (base[-1].arrival - base[0].arrival)
    jobs = [(v, c, slo) for slo in args.slo for c in args.costs for v in VARIANTS
            if not (v == "no store" and c != args.costs[0])]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {j: pool.submit(curve, *j, args, base_rate) for j in jobs}
        results = {j: f.result() for j, f in futures.items()}
    doc: dict[str, Any] = {"requests": args.requests, "skip": args.skip, "instances": args.instances,
                           "profile": args.profile, "block_size": args.block_size, "base_rate": base_rate,
                           "results": [{"variant": v, "store_token_cost": c, "slo": slo, "points": pts}
                                       for (v, c, slo), pts in results.items()]}
    print(f"\n{args.requests} Mooncake requests from #{args.skip}, {args.instances} × {args.profile}, "
          f"block {args.block_size}, DualMap ({time.perf_counter() - t0:.0f} s)\n")
    print("| TTFT SLO | load cost | variant | effective capacity (req/s) | hit rate | loaded from store | "
          "TTFT p50 / p99 at capacity (s) | attainment by rate (req/s: %) |")
    print("|---:|---:|---|---:|---:|---:|---|---|")
    for (v, c, slo), pts in results.items():
        cap = effective_capacity([(p["rate"], p["slo_attainment"]) for p in pts])
        near = min(pts, key=lambda p: abs(p["rate"] - cap))
        text = ", ".join(f"{p['rate']:.1f}: {p['slo_attainment']:.0%}" for p in pts)
        cost = "-" if v == "no store" else f"{c:g}"
        print(f"| {slo:g} | {cost} | {v} | {cap:.2f} | {near.get('cache_hit_rate', 0):.1%} | "
              f"{near['store_share']:.1%} | {near['ttft_p50_s']:.2f} / {near['ttft_p99_s']:.2f} | {text} |",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
