"""Soak: `kvpilot router` in front of simulated workers at 80% of their capacity for minutes on
end, counting every answer and sampling the router's memory.

    .venv/bin/python -P bench/soak.py [--minutes 10] [--load 0.8] [--workload agentic] [--seed 1]
        [--workers 4] [--max-tokens 64] [--capacity R] [--time-scale 0.25]

Capacity is measured first, in virtual time, for exactly this setup (`--workers` ×
h100-llama3-8b, DualMap, this workload and seed with outputs capped at `--max-tokens`): the
highest rate, in steps of ×1.25, at which ≥ 90% of requests get their first token within the
5 s SLO over `--probe-s` seconds of arrivals (`--capacity` skips the search). The live run then
replays the same workload at `--load` × that rate, open loop, through the router's client port
with the demo's streaming client. The workers run at `--time-scale` × modelled speed and the
arrivals are stretched to match, so the live fleet's capacity is time-scale × the modelled one:
at time scale 1 on two cores, the host's CPU (router, workers and client streaming every token)
ran out before the modelled GPUs did, so the soak was past capacity, not at 80% of it. TTFTs are
reported in modelled seconds; `--minutes` is wall time. Reported:
requests sent and answered by status, streams that ended without a token, TTFT percentiles and
attainment, the router's answers by outcome from its own counters, and its resident memory (the
whole process group) every 10 s with the least-squares slope over the second half of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kvpilot.demo import RunResult, replay
from kvpilot.procs import group_processes
from kvpilot.sim.cluster import Cluster, ClusterConfig, percentile
from kvpilot.sim.families import make_workload
from kvpilot.sim.workload import RequestSpec
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker

SLO_S = 5.0
PROFILE = "h100-llama3-8b"


def capped(specs: list[RequestSpec], max_tokens: int) -> list[RequestSpec]:
    return [dataclasses.replace(s, max_tokens=min(s.max_tokens, max_tokens)) for s in specs]


def attainment_at(rate: float, args: argparse.Namespace) -> float:
    specs = capped(make_workload(args.workload, max(500, int(rate * args.probe_s)), rate, args.seed), args.max_tokens)
    cfg = ClusterConfig(instances=args.workers, profile=PROFILE, policy="dualmap", seed=args.seed, slo_ttft_s=SLO_S)
    report = Cluster(cfg).run(specs)
    return sum(1 for r in report.results if r.ttft <= SLO_S) / max(1, len(report.results))


def capacity(args: argparse.Namespace) -> float:
    rate, best = args.probe_start, 0.0
    while (ok := attainment_at(rate, args)) >= 0.9:
        print(f"  virtual time: {rate:.2f} req/s -> {ok:.1%} within {SLO_S:g} s", flush=True)
        best, rate = rate, rate * 1.25
    print(f"  virtual time: {rate:.2f} req/s -> {ok:.1%} within {SLO_S:g} s", flush=True)
    if best == 0.0:
        raise SystemExit(f"under 90% within the SLO already at {args.probe_start} req/s: lower --probe-start")
    return best


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in group `pgid` (the router and any worker processes)."""
    total = 0
    for entry, _ in group_processes(pgid):
        try:
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue   # gone since the listing
    return total / 1024


def router_outcomes(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "kvpilot_router_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = sample.labels.get("outcome", "?")
                    out[key] = out.get(key, 0.0) + sample.value
    return out


async def soak(router: RouterProcess, specs: list[RequestSpec], result: RunResult,
               rss: list[tuple[float, float]], time_scale: float) -> None:
    t0 = time.monotonic()

    async def sample() -> None:
        while True:
            rss.append((time.monotonic() - t0, group_rss_mib(router.proc.pid)))
            await asyncio.sleep(10)

    sampler = asyncio.create_task(sample())
    try:
        await replay(router.url, "sim-model", specs, time_scale, 1.0, result, slo_ttft_s=SLO_S, max_tokens=10**9)
    finally:
        sampler.cancel()
    rss.append((time.monotonic() - t0, group_rss_mib(router.proc.pid)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    ap.add_argument("--workload", default="agentic")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--capacity", type=float, help="req/s; skips the virtual-time search")
    ap.add_argument("--probe-s", type=float, default=120.0, help="seconds of arrivals per search step")
    ap.add_argument("--probe-start", type=float, default=8.0, help="req/s the search starts at")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="workers run this × modelled speed (below 1: slower, fewer live req/s for the host)")
    args = ap.parse_args()
    cap = args.capacity if args.capacity else capacity(args)
    rate = args.load * cap
    n = int(rate * args.time_scale * args.minutes * 60)
    specs = capped(make_workload(args.workload, n, rate, args.seed), args.max_tokens)
    print(f"capacity {cap:.2f} req/s modelled; soak at {rate:.2f} req/s modelled = {rate * args.time_scale:.2f} "
          f"req/s live (time scale {args.time_scale:g}): {n} requests over {args.minutes:g} min", flush=True)
    workers = [SimWorker("--profile", PROFILE, "--time-scale", str(args.time_scale)) for _ in range(args.workers)]
    router = RouterProcess([{"name": "sim-model", "policy": "dualmap",
                             "endpoints": [{"name": f"w{i}", "url": w.url} for i, w in enumerate(workers)]}])
    result = RunResult("dualmap")
    rss: list[tuple[float, float]] = []
    try:
        t0 = time.monotonic()
        asyncio.run(soak(router, specs, result, rss, args.time_scale))
        wall = time.monotonic() - t0
        outcomes = router_outcomes(router.url)
    finally:
        router.stop()
        for w in workers:
            w.stop()
    answered = len(result.ttft)
    within = sum(1 for t in result.ttft if t <= SLO_S) / max(1, n)
    half = [(t, m) for t, m in rss if t >= rss[-1][0] / 2] or rss
    slope = statistics.linear_regression([t for t, _ in half], [m for _, m in half]).slope * 60 \
        if len(half) > 1 else 0.0
    load = os.getloadavg()
    print(f"\n{args.workload} seed {args.seed}, {args.workers} × {PROFILE}, max_tokens {args.max_tokens}: "
          f"{rate:.2f} req/s = {args.load:g} × {cap:.2f} modelled, time scale {args.time_scale:g}, for {wall:.0f} s "
          f"(load average {load[0]:.1f})")
    print(f"sent {n}; streamed to the end {answered}; errors (non-200, broken or empty streams) {result.errors}")
    print(f"router outcomes: {', '.join(f'{k} {v:.0f}' for k, v in sorted(outcomes.items()))}")
    print(f"TTFT p50 {percentile(result.ttft, 50):.2f} s, p99 {percentile(result.ttft, 99):.2f} s; "
          f"within {SLO_S:g} s: {within:.1%}")
    print(f"router RSS MiB: start {rss[0][1]:.0f}, end {rss[-1][1]:.0f}, max {max(m for _, m in rss):.0f}; "
          f"slope over the second half {slope:+.2f} MiB/min")
    print("RSS samples (s, MiB): " + " ".join(f"{t:.0f}:{m:.0f}" for t, m in rss))


if __name__ == "__main__":
    main()
