"""Routing quality in the virtual-time cluster: SLO attainment vs request rate, per policy.

    .venv/bin/python -P bench/routing_quality.py [--requests 3000] [--skip 0] [--slo 5 2] [--policies ...]
        [--ablations] [--jobs 2]

Mooncake conversation trace (first N requests, time-compressed to each rate), 8 instances of
the h100-llama3-8b profile, KV block size 64 (a multiple of 16 that keeps the sweep fast; the
trace's prefix granularity is 512 tokens, so hits are unchanged). For each policy: attainment at
each rate, **effective capacity** (the highest swept rate with ≥ 90% of requests within the TTFT
SLO, interpolated between grid points), cache hit rate and load imbalance at that rate.
`--profile` swaps the hardware × model profile (the DualMap paper ran Qwen2.5-7B, whose
smaller KV per token holds 2.2× more tokens per instance). `--skip N` starts the slice at the
trace's N-th request (a second slice checks that a result is not an accident of the first
3,000). `--ablations` adds DualMap with parts switched off, to say where its capacity comes
from. Writes a Markdown table to stdout and JSON to
bench/out/routing_quality.json.

    .venv/bin/python -P bench/routing_quality.py --workloads agentic chat rag no-reuse mooncake \
        --seeds 2 3 [--profile ...] [--slo 5 2] [--policies ...] [--ablations ...]

With `--workloads`, the family in `kvpilot.sim.families` instead: for each workload, seed, SLO
and policy a capacity search (rates ×1.25 from half the workload's service bound until attainment
drops under 90%, then two bisections), and each workload's service bound (`bench/service_bound.py`).
Seeds are the held-out discipline: develop on some, report on others.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from kvpilot import plots
from kvpilot.router.policies import POLICIES
from kvpilot.router.policies.dualmap import DualMap
from kvpilot.sim.cluster import Cluster, ClusterConfig, policy_context
from kvpilot.sim.workload import RequestSpec, mooncake

sys.path.insert(0, str(Path(__file__).parent))   # bench/ is not a package; -P keeps it off the path
from family_capacity import run_family

TARGET = 0.9
# DualMap with one mechanism switched off each (same everything else).
ABLATIONS: dict[str, dict[str, Any]] = {
    "dualmap, FIFO queues": {"max_wait_slos": 0.0},
    "dualmap, no idle takeover": {"steal": False},
    "dualmap, linear predictor": {"attention_tokens": 0},
    "dualmap, no KV budget": {"kv_high": None},
    "dualmap, no starvation bound": {"max_wait_slos": None},
    # The SLO switch on the request's own TTFT alone, without charging the prefill it adds (before 12-02).
    "dualmap, switch on own TTFT": {"switch_cost": False},
    # Hot-prefix keying (router/depth.py): the earlier one-block-per-window extension of a fixed
    # 1,024-token key, a fixed key, and hot prefixes marked at a full instance's share (not half).
    "dualmap, extend keying (before)": {"keying": "extend"},
    "dualmap, fixed key": {"keying": "fixed"},
    "dualmap, hot at 1/N": {"spread_share": 1.0},
}


def trace(skip: int, n: int, speedup: float) -> list[RequestSpec]:
    """Requests skip..skip+n of the Mooncake trace, time-compressed, starting at t = 0."""
    specs = mooncake(limit=skip + n, speedup=speedup)[skip:]
    t0 = specs[0].arrival
    for s in specs:
        s.arrival -= t0
    return specs


def curve(policy: str, slo: float, args: argparse.Namespace, base_rate: float) -> list[dict[str, Any]]:
    details = []
    for s in args.speedups:
        specs = trace(args.skip, args.requests, s)
        cfg = ClusterConfig(instances=args.instances, profile=args.profile, policy=policy if policy in POLICIES else
                            "dualmap", block_size=args.block_size, slo_ttft_s=slo)
        custom = None
        if policy in ABLATIONS:
            custom = DualMap(policy_context(cfg), **ABLATIONS[policy])
        summary = Cluster(cfg, custom).run(specs).summary
        details.append({"rate": base_rate * s, **summary})
        if summary["slo_attainment"] < 0.5:
            break  # far past capacity: higher rates only get worse
    return details


def effective_capacity(curve: list[tuple[float, float]]) -> float:
    """Highest rate with attainment ≥ TARGET, linearly interpolated to where the curve crosses it."""
    best = 0.0
    for (r0, a0), (r1, a1) in itertools.pairwise(curve):
        if a0 >= TARGET:
            best = r0
            if a1 < TARGET:
                return r0 + (r1 - r0) * (a0 - TARGET) / (a0 - a1)
    if curve and curve[-1][1] >= TARGET:
        best = curve[-1][0]
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--slo", type=float, nargs="+", default=[5.0, 2.0])
    parser.add_argument("--speedups", type=float, nargs="+",
                        default=[0.25, 0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0])
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--ablations", nargs="*", default=None, help="DualMap variants (none named: all)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--profile", default="h100-llama3-8b")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/out/routing_quality.json"))
    parser.add_argument("--replot", type=Path, help="only draw the PNG from an earlier --out file")
    parser.add_argument("--workloads", nargs="*", help="the workload family (kvpilot.sim.families) instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="--workloads: seeds, each its own run")
    parser.add_argument("--grid", type=float, nargs="*",
                        help="--workloads: attainment at these fractions of the service bound instead of a search")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="--workloads: at least this many seconds of arrivals per run")
    args = parser.parse_args()
    if args.workloads:
        run_family(args, ABLATIONS)
        return
    if args.replot:
        print(f"plot: {plot(json.loads(args.replot.read_text()), args.replot.with_suffix('.png'))}")
        return
    base = trace(args.skip, args.requests, 1.0)
    base_rate = len(base) / (base[-1].arrival - base[0].arrival)
    ablations = [] if args.ablations is None else [a for a in ABLATIONS if not args.ablations or a in args.ablations]
    policies = list(args.policies) + ablations
    doc: dict[str, Any] = {"requests": args.requests, "skip": args.skip, "instances": args.instances,
                           "profile": args.profile,
                           "base_rate": base_rate, "block_size": args.block_size, "results": {}}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool, Progress(console=Console(stderr=True)) as progress:
        futures = {(slo, p): pool.submit(curve, p, slo, args, base_rate) for slo in args.slo for p in policies}
        task = progress.add_task("curves", total=len(futures))
        for f in futures.values():
            f.add_done_callback(lambda _: progress.advance(task))
        for slo in args.slo:
            rows = []
            for policy in policies:
                details = futures[(slo, policy)].result()
                points = [(d["rate"], d["slo_attainment"]) for d in details]
                cap = effective_capacity(points)
                near = min(details, key=lambda d: abs(d["rate"] - cap)) if details else {}
                rows.append((policy, cap, near.get("cache_hit_rate", 0.0), near.get("load_imbalance", 0.0), points))
                doc["results"].setdefault(str(slo), {})[policy] = {"capacity_rps": cap, "points": details}
            rr = next((r[1] for r in rows if r[0] == "round-robin"), 0.0)
            best = max((r[1] for r in rows if r[0] in POLICIES and r[0] != "dualmap"), default=0.0)
            print(f"\n### TTFT SLO {slo:g} s ({args.requests} Mooncake requests from #{args.skip}, "
                  f"{args.instances} × {args.profile})\n")
            print("| policy | effective capacity (req/s) | × round-robin | × best baseline | hit rate at capacity | "
                  "imbalance | attainment by rate (req/s: %) |")
            print("|---|---:|---:|---:|---:|---:|---|")
            for policy, cap, hit, imb, pts in sorted(rows, key=lambda r: -r[1]):
                text = ", ".join(f"{r:.1f}: {a:.0%}" for r, a in pts)
                ratio = f"{cap / rr:.2f}" if rr else "-"
                vs_best = f"{cap / best:.2f}" if best else "-"
                print(f"| {policy} | {cap:.2f} | {ratio} | {vs_best} | {hit:.1%} | {imb:.2f} | {text} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"\n(wall {time.perf_counter() - t0:.0f} s; base trace rate {base_rate:.2f} req/s)")
    print(f"plot: {plot(doc, args.out.with_suffix('.png'))}")


def plot(doc: dict[str, Any], path: Path) -> Path:
    """SLO attainment against request rate, one panel per TTFT SLO, one line per policy."""
    slos = list(doc["results"])
    fig, axes = plots.subplots(1, len(slos), figsize=(6 * len(slos), 4.2), squeeze=False)
    for ax, slo in zip(axes[0], slos, strict=True):
        for policy, res in doc["results"][slo].items():
            if policy not in POLICIES:
                continue  # ablations stay in the table
            pts = [(d["rate"], d["slo_attainment"]) for d in res["points"]]
            ax.plot([r for r, _ in pts], [a for _, a in pts], marker=".",
                    label=f"{policy} ({res['capacity_rps']:.2f} req/s)", linewidth=2.5 if policy == "dualmap" else 1)
        ax.axhline(0.9, color="gray", linestyle=":")
        ax.set_title(f"TTFT SLO {float(slo):g} s")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("share of requests within SLO")
        ax.legend(fontsize=7)
    fig.suptitle(f"{doc['requests']} Mooncake requests, {doc['instances']} × {doc.get('profile', '')}")
    return plots.save(fig, path)


if __name__ == "__main__":
    main()
