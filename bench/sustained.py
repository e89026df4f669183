"""Sustained capacity points: one long virtual-time run per (workload, seed, policy, rate).

    .venv/bin/python -P bench/sustained.py --workload agentic --seed 1 --policy dualmap \
        --rates 80 90 100 [--duration 300] [--profile h100-llama3-8b] [--slo 5 2] [--jobs 2]

A capacity search on short runs (`routing_quality.py --workloads`, 40-60 s of arrivals) can
call a rate sustainable whose queue grows without bound but has not yet pushed TTFTs past the
SLO. Here every run has `--duration` seconds of arrivals (default 300), and besides the share of
all requests within each SLO it reports the share among the requests that arrived in the last
third of the run ("steady"): at a rate the fleet sustains the queue is stationary and the last
third's attainment equals the whole run's (up to noise); past it the queue grows through the
run and the last third is the worst of it. A rate counts as sustained when the last third's
attainment is >= 90%. One JSON line per run is appended to `--out` (bench/out/sustained.jsonl),
with the command that produced it; `--report` prints the table of a file's rows.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from kvpilot.router.policies import POLICIES
from kvpilot.sim.cluster import Cluster, ClusterConfig
from kvpilot.sim.families import make_workload

TARGET = 0.9


def steady_share(arrivals: list[float], ttfts: list[float], slo: float, tail: float = 1 / 3) -> float:
    """Share within `slo` among requests that arrived in the last `tail` of the arrival span."""
    if not arrivals:
        return math.nan
    lo, hi = min(arrivals), max(arrivals)
    cut = hi - tail * (hi - lo)
    late = [t for a, t in zip(arrivals, ttfts, strict=True) if a >= cut]
    return sum(1 for t in late if t <= slo) / len(late) if late else math.nan


def sustained_capacity(points: list[tuple[float, float]]) -> float:
    """Highest rate whose steady attainment is >= TARGET, linearly interpolated to the first
    crossing above it (points: (rate, steady attainment)); 0 when even the lowest fails."""
    pts = sorted(points)
    cap = 0.0
    for i, (r, a) in enumerate(pts):
        if a < TARGET:
            if i:
                r0, a0 = pts[i - 1]
                cap = r0 + (r - r0) * (a0 - TARGET) / (a0 - a)
            return cap
        cap = r
    return cap


def run_one(workload: str, seed: int, policy: str, rate: float, duration: float, profile: str, instances: int,
            block_size: int, slos: list[float]) -> dict[str, Any]:
    t0 = time.perf_counter()
    n = max(1, math.ceil(rate * duration))
    specs = make_workload(workload, n, rate, seed)
    cfg = ClusterConfig(instances=instances, profile=profile, policy=policy, block_size=block_size,
                        slo_ttft_s=slos[0])
    report = Cluster(cfg).run(specs)
    res = report.results
    arrivals = [r.arrival for r in res]
    ttfts = [r.ttft for r in res]
    s = report.summary
    busy = [st.busy_s / report.makespan_s for st in report.instances] if report.makespan_s else []
    return {
        "workload": workload, "seed": seed, "policy": policy, "rate": rate, "duration": duration,
        "profile": profile, "instances": instances, "requests": len(res),
        "attainment": {str(slo): sum(1 for t in ttfts if t <= slo) / len(res) for slo in slos},
        "steady": {str(slo): steady_share(arrivals, ttfts, slo) for slo in slos},
        "hit_rate": s["cache_hit_rate"], "imbalance": s["load_imbalance"], "ttft_p99_s": s["ttft_p99_s"],
        "preemptions": s["preemptions"], "busy": sum(busy) / len(busy) if busy else math.nan,
        "wall_s": time.perf_counter() - t0,
    }


def report(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, int, str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        for slo in r["steady"]:
            groups.setdefault((r["workload"], r["seed"], r["profile"], r["policy"], float(slo)), []).append(r)
    print("| workload | seed | profile | SLO | policy | sustained capacity (req/s) | steady / all attainment by rate |")
    print("|---|---:|---|---:|---|---:|---|")
    for (w, seed, prof, pol, slo), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["rate"])
        key = str(slo) if str(slo) in rs[0]["steady"] else f"{slo:g}"
        cap = sustained_capacity([(r["rate"], r["steady"][key]) for r in rs])
        above = "" if any(r["steady"][key] < TARGET for r in rs) else ">= "
        pts = ", ".join(f"{r['rate']:g}: {r['steady'][key]:.0%}/{r['attainment'][key]:.0%} (hit {r['hit_rate']:.1%})"
                        for r in rs)
        print(f"| {w} | {seed} | {prof} | {slo:g} s | {pol} | {above}{cap:.1f} | {pts} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="agentic")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policy", nargs="+", default=["dualmap"], choices=sorted(POLICIES))
    parser.add_argument("--rates", type=float, nargs="+", default=[])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per run")
    parser.add_argument("--profile", default="h100-llama3-8b")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--slo", type=float, nargs="+", default=[5.0, 2.0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/out/sustained.jsonl"))
    parser.add_argument("--report", type=Path, help="only print the table of an --out file")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "-P", *sys.argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # DualMap reads the SLO (its starvation bound, its queue predictor): one run per SLO.
    jobs = [(args.workload, args.seed, p, r, args.duration, args.profile, args.instances, args.block_size, slos)
            for r in args.rates for p in args.policy
            for slos in ([[s] for s in args.slo] if p == "dualmap" else [args.slo])]
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(run_one, *zip(*jobs, strict=True)):
            row["command"] = cmd
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)


if __name__ == "__main__":
    main()
