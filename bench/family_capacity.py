"""Effective capacity of each routing policy on each workload of the family (virtual time).

Used by `bench/routing_quality.py --workloads ...`. For one (workload, seed, SLO, policy) the
search starts at 0.5 × the workload's service bound (`service_bound.py`), multiplies the rate by
1.25 while ≥ 90% of requests meet the TTFT SLO, then bisects the last bracket twice (in log
space); capacity is interpolated linearly inside the final bracket. Same seed, other rate:
the same requests closer together (kvpilot.sim.families), so the curve is one workload's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from service_bound import service_bound  # bench/ (routing_quality.py puts it on the path)

from kvpilot.router.policies import POLICIES
from kvpilot.router.policies.dualmap import DualMap
from kvpilot.router.policy import Policy
from kvpilot.sim.cluster import Cluster, ClusterConfig, policy_context
from kvpilot.sim.families import make_workload
from kvpilot.sim.profiles import get_profile

TARGET = 0.9
BASELINES = ("cache-aware", "min-ttft", "least-loaded", "consistent-hash")
DEFAULT = ("dualmap", *BASELINES)


def _policy(name: str, cfg: ClusterConfig, ablations: dict[str, dict[str, Any]]) -> Policy | None:
    return DualMap(policy_context(cfg), **ablations[name]) if name in ablations else None


def run_at(workload: str, seed: int, rate: float, slos: list[float], policy: str, args: argparse.Namespace,
           ablations: dict[str, dict[str, Any]]) -> dict[float, dict[str, Any]]:
    """One run; its summary per SLO (a policy that does not read the SLO is run once for all)."""
    # At least `duration` seconds of arrivals: a shorter run lets a queue that grows without bound
    # still finish within the SLO (3,000 requests at 100 req/s last 30 s).
    specs = make_workload(workload, max(args.requests, math.ceil(rate * args.duration)), rate, seed)
    cfg = ClusterConfig(instances=args.instances, profile=args.profile, policy=policy if policy in POLICIES else
                        "dualmap", block_size=args.block_size, slo_ttft_s=slos[0])
    report = Cluster(cfg, _policy(policy, cfg, ablations)).run(specs)
    out = {}
    for slo in slos:
        ok = sum(1 for r in report.results if r.ttft <= slo)
        out[slo] = {"rate": rate, **report.summary, "slo_attainment": ok / max(1, len(report.results))}
    return out


def search(workload: str, seed: int, slos: list[float], policy: str, bound: float, args: argparse.Namespace,
           ablations: dict[str, dict[str, Any]]) -> dict[float, dict[str, Any]]:
    """The capacity search for each SLO; runs are shared between SLOs where the rates meet."""
    runs: dict[float, dict[float, dict[str, Any]]] = {}

    def run(rate: float) -> dict[float, dict[str, Any]]:
        if rate not in runs:
            runs[rate] = run_at(workload, seed, rate, slos, policy, args, ablations)
        return runs[rate]
    if args.grid:
        return {slo: _grid(slo, [f * bound for f in args.grid], run) for slo in slos}
    return {slo: _search(slo, bound, run) for slo in slos}


def _grid(slo: float, rates: list[float], run: Any) -> dict[str, Any]:
    """Attainment at fixed rates (fractions of the bound); capacity interpolated where the curve
    crosses 90%, 0 when it is under 90% already at the lowest rate (read: below it), the
    highest rate when it never crosses (read: at least that)."""
    points = [run(r)[slo] for r in sorted(rates)]
    cap = points[-1]["rate"] if points[-1]["slo_attainment"] >= TARGET else 0.0
    for p0, p1 in itertools.pairwise(points):
        a0, a1 = p0["slo_attainment"], p1["slo_attainment"]
        if a0 >= TARGET > a1:
            cap = p0["rate"] + (p1["rate"] - p0["rate"]) * (a0 - TARGET) / (a0 - a1)
            break
    good = [p for p in points if p["slo_attainment"] >= TARGET]
    near = good[-1] if good else points[0]
    return {"capacity_rps": cap, "hit_rate": near["cache_hit_rate"], "imbalance": near["load_imbalance"],
            "points": points}


def _search(slo: float, bound: float, run: Any) -> dict[str, Any]:
    points: dict[float, dict[str, Any]] = {}

    def at(rate: float) -> float:
        if rate not in points:
            points[rate] = run(rate)[slo]
        return float(points[rate]["slo_attainment"])

    rate = 0.5 * bound
    good, bad = 0.0, math.inf
    if at(rate) >= TARGET:
        good = rate
        for _ in range(14):
            rate *= 1.25
            if at(rate) < TARGET:
                bad = rate
                break
            good = rate
    else:
        bad = rate
        while rate > 0.02 * bound:
            rate /= 1.5
            if at(rate) >= TARGET:
                good = rate
                break
            bad = rate
    if good and bad < math.inf:
        for _ in range(2):
            mid = math.sqrt(good * bad)
            if at(mid) >= TARGET:
                good = mid
            else:
                bad = mid
    if not good:
        cap = 0.0
    elif bad == math.inf:
        cap = good
    else:
        a0, a1 = at(good), at(bad)
        cap = good + (bad - good) * (a0 - TARGET) / (a0 - a1) if a0 > a1 else good
    near = points[good] if good else points[min(points)]
    return {"capacity_rps": cap, "hit_rate": near["cache_hit_rate"], "imbalance": near["load_imbalance"],
            "points": [points[r] for r in sorted(points)]}


def run_family(args: argparse.Namespace, ablations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    policies = list(DEFAULT) if list(args.policies) == list(POLICIES) else list(args.policies)
    policies += [] if args.ablations is None else [a for a in ablations if not args.ablations or a in args.ablations]
    profile = get_profile(args.profile)
    bounds: dict[tuple[str, int, float], Any] = {}
    for w in args.workloads:
        for seed in args.seeds:
            specs = make_workload(w, args.requests, 1.0, seed)
            for slo in args.slo:
                bounds[(w, seed, slo)] = service_bound(specs, profile, args.instances, slo)
    slos = list(args.slo)
    # Policies that read the SLO (DualMap and its variants) get a run per SLO; the rest one for all.
    groups = [(p, [slo]) for p in policies if p == "dualmap" or p in ablations for slo in slos] + \
        [(p, slos) for p in policies if p != "dualmap" and p not in ablations]
    doc: dict[str, Any] = {"requests": args.requests, "instances": args.instances, "profile": args.profile,
                           "block_size": args.block_size, "seeds": args.seeds, "results": {}}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {(w, seed, p, tuple(group)): pool.submit(search, w, seed, group, p,
                                                           bounds[(w, seed, group[0])].rate, args, ablations)
                   for w in args.workloads for seed in args.seeds for p, group in groups}
        for w in args.workloads:
            done = {}
            for (w2, seed, p, _group), f in futures.items():
                if w2 == w:
                    for slo, res in f.result().items():
                        done[(seed, slo, p)] = res
            for slo in args.slo:
                _table(doc, w, slo, policies, args, bounds, done)
    out = args.out.with_name("routing_family.json") if args.out.name == "routing_quality.json" else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"\n(wall {time.perf_counter() - t0:.0f} s; {out})")
    return doc


def _table(doc: dict[str, Any], w: str, slo: float, policies: list[str], args: argparse.Namespace,
           bounds: dict[tuple[str, int, float], Any], done: dict[tuple[int, float, str], Any]) -> None:
    res = {(seed, p): done[(seed, slo, p)] for seed in args.seeds for p in policies}
    doc["results"].setdefault(w, {})[str(slo)] = {f"{p}@{seed}": r for (seed, p), r in res.items()}
    b = [bounds[(w, seed, slo)] for seed in args.seeds]
    bound = statistics.mean(x.rate for x in b)
    print(f"\n### {w}, TTFT SLO {slo:g} s ({args.requests} requests, seeds {' '.join(map(str, args.seeds))}, "
          f"{args.instances} × {args.profile})\n")
    print(f"Service bound {bound:.2f} req/s (ideal hit rate {statistics.mean(x.ideal_hit_rate for x in b):.1%}, "
          f"{statistics.mean(x.too_long for x in b):.1%} of requests over the SLO even alone).\n")
    grid = " | attainment by rate (req/s: %)" if args.grid else ""
    print(f"| policy | capacity (req/s) per seed | mean | × best baseline | × bound | hit rate | imbalance{grid} |")
    print("|---|---|---:|---:|---:|---:|---:|" + ("---|" if grid else ""))
    best = {seed: max((res[(seed, p)]["capacity_rps"] for p in policies if p in BASELINES), default=0.0)
            for seed in args.seeds}
    rows = []
    for p in policies:
        caps = [res[(seed, p)]["capacity_rps"] for seed in args.seeds]
        vs = [c / best[seed] for c, seed in zip(caps, args.seeds, strict=True) if best[seed]]
        rows.append((statistics.mean(caps), p, caps, vs))
    for mean, p, caps, vs in sorted(rows, key=lambda r: -r[0]):
        hit = statistics.mean(res[(seed, p)]["hit_rate"] for seed in args.seeds)
        imb = statistics.mean(res[(seed, p)]["imbalance"] for seed in args.seeds)
        ratio = f"{statistics.mean(vs):.2f} ({min(vs):.2f}-{max(vs):.2f})" if vs else "-"
        curve = ""
        if args.grid:
            curve = " " + "; ".join(", ".join(f"{d['rate']:.1f}: {d['slo_attainment']:.0%}"
                                              for d in res[(seed, p)]["points"]) for seed in args.seeds) + " |"
        print(f"| {p} | {' / '.join(f'{c:.2f}' for c in caps)} | {mean:.2f} | {ratio} | {mean / bound:.2f} | "
              f"{hit:.1%} | {imb:.2f} |{curve}", flush=True)


def main() -> None:  # pragma: no cover - routing_quality.py is the entry point
    raise SystemExit("run bench/routing_quality.py --workloads ...")


if __name__ == "__main__":
    main()
