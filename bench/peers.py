"""kvpilot router (DualMap and its baselines) side by side with sglang-router and vllm-router, live.

    bash scripts/peers-env.sh     # once: the peers from PyPI into a bench-only venv (cached, ~2 min)
    .venv/bin/python -P bench/peers.py [--workloads mooncake agentic] [--repeats 2] [--requests 150]
    kvpilot bench peers --mooncake-rates 4 8 --agentic-rates 6 --repeats 3      # a longer run

Every contender — `kvpilot router` with each of its policies, `sglang-router` and `vllm-router`
with every policy their CLIs offer for a plain fleet (kvpilot.testing.peers.PEER_POLICIES) — stands
in turn in front of the *same* fleet of `kvpilot sim serve` workers, which start once; before each
run their prefix caches are reset (POST /reset_prefix_cache, as vLLM's dev endpoint), so every run
starts cold. Each run replays the same seeded slice of a workload (Mooncake conversation trace, or
a generated family member: kvpilot.sim.families) at a rate step, as streaming completions, open
loop; repeat k uses seed `--seed + k` for every contender, so contenders are compared on equal
traffic and the spread over repeats covers both the machine's noise and the slice.

Measured per run: SLO attainment (TTFT within the SLO, failures count as misses), TTFT p50/p90/p99
(modelled seconds: workers run `--time-scale`× faster than the GPUs they model), the engine-side
prefix-cache hit rate from the workers' own vllm:prefix_cache_hits/queries counters (the delta over
the run), and the router's CPU seconds per 1,000 requests (user+system of its whole process group,
from /proc, measured from readiness to the last answer). Within a repeat the contenders' order
rotates, so no one always runs first on a warm machine. Results: bench/results/peers.{json,md,png}.

On a shared 2-core machine client, router and workers compete for the CPU: the numbers are recorded
with the load average and should be read as loaded. The default matrix (15 contenders × 3 rate steps
× 2 repeats = 90 runs) takes about 17 minutes there (78 runs took 14). `--kvpilot-policies` also
takes `dualmap-nohold`: DualMap with its router-side queues off, an ablation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kvpilot.demo import RunResult, replay, worker_counters
from kvpilot.procs import wait_for
from kvpilot.sim.cluster import percentile
from kvpilot.sim.families import make_workload
from kvpilot.sim.profiles import get_profile
from kvpilot.testing.peers import PEER_POLICIES, PeerRouter, group_cpu_seconds, peers_venv
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker

sys.path.insert(0, str(Path(__file__).parent))
from peers_report import write_report

RESULTS = Path(__file__).parent / "results"
KVPILOT_POLICIES = ("dualmap", "cache-aware", "consistent-hash", "least-loaded", "min-ttft", "round-robin")
MODEL = "sim-model"


@dataclass(frozen=True)
class Contender:
    router: str          # kvpilot | sglang | vllm
    policy: str

    @property
    def label(self) -> str:
        return f"{self.router}:{self.policy}"


@dataclass
class Run:
    contender: str
    workload: str
    rate: float          # modelled requests per second
    repeat: int
    seed: int
    requests: int
    completed: int
    errors: int
    attainment: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    hit_rate: float
    router_cpu_s: float
    cpu_s_per_1k: float
    wall_s: float
    cache_hits: float = 0.0      # prompt tokens served from the engines' prefix caches during the run
    cache_queries: float = 0.0   # prompt tokens the engines looked up during the run


class Fleet:
    """The workers every contender stands in front of, started once, in parallel."""

    def __init__(self, n: int, worker_args: list[str], workdir: Path) -> None:
        self.workers = [SimWorker(*worker_args, model=MODEL, workdir=workdir, wait=False) for _ in range(n)]
        try:
            for w in self.workers:
                wait_for(w.healthy, 60, f"sim worker on port {w.port}", w.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [w.url for w in self.workers]

    def reset(self) -> None:
        """Every worker's prefix cache dropped: each run starts cold."""
        for url in self.urls:
            req = urllib.request.Request(url + "/reset_prefix_cache", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=10):
                pass

    def counters(self) -> tuple[float, float]:
        """(hits, queries) summed over the workers' vllm:prefix_cache_*_total."""
        hits = queries = 0.0
        for url in self.urls:
            got = worker_counters(url)
            if got is None:
                raise RuntimeError(f"worker {url} did not answer /metrics")
            hits, queries = hits + got[0], queries + got[1]
        return hits, queries

    def stop(self) -> None:
        for w in self.workers:
            w.stop()


def kvpilot_router(policy: str, urls: list[str], args: argparse.Namespace) -> RouterProcess:
    """kvpilot's router as `kvpilot router` runs it, configured in the workers' wall time. A policy
    name ending in `-nohold` (e.g. `dualmap-nohold`) is that policy with router-side queues off: an
    ablation of DualMap's holding, not a policy of its own."""
    base = policy.removesuffix("-nohold")
    return RouterProcess([{
        "name": MODEL, "policy": base, "holdRequests": base == policy,
        "endpoints": [{"name": f"w{i}", "url": u} for i, u in enumerate(urls)],
        # The router measures wall time; the workers run time_scale× faster than the modelled GPUs.
        "ttftMs": args.slo_ttft * 1000 / args.time_scale,
        "prefillTokenSeconds": get_profile(args.profile).prefill_token_s / args.time_scale,
        "kvCapacityTokens": args.kv_capacity_tokens}], workdir=args.workdir, maxRetries=0)


def start_router(c: Contender, urls: list[str], args: argparse.Namespace) -> tuple[str, int, Callable[[], None]]:
    """(url, process group id, stop) of a ready router."""
    if c.router == "kvpilot":
        r = kvpilot_router(c.policy, urls, args)
        return r.url, r.proc.pid, r.stop
    p = PeerRouter(c.router, c.policy, urls, venv=args.peers_venv, workdir=args.workdir)
    return p.url, p.pid, p.stop


def measure(c: Contender, fleet: Fleet, specs: list, args: argparse.Namespace, workload: str, rate: float,
            repeat: int, seed: int) -> Run:
    """One replay of `specs` through one contender, cold caches, with the bench's accounting."""
    fleet.reset()
    h0, q0 = fleet.counters()
    url, pgid, stop = start_router(c, fleet.urls, args)
    try:
        cpu0, t0 = group_cpu_seconds(pgid), time.monotonic()
        result = RunResult(c.label)
        asyncio.run(replay(url, MODEL, specs, args.time_scale, 1.0, result, None, args.slo_ttft, args.max_tokens))
        cpu, wall = group_cpu_seconds(pgid) - cpu0, time.monotonic() - t0
    finally:
        stop()
    h1, q1 = fleet.counters()
    n = len(specs)
    ok = sum(1 for t in result.ttft if t <= args.slo_ttft)
    return Run(c.label, workload, rate, repeat, seed, n, len(result.ttft), result.errors, ok / n,
               percentile(result.ttft, 50), percentile(result.ttft, 90), percentile(result.ttft, 99),
               (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0, cpu, cpu / n * 1000, wall, h1 - h0, q1 - q0)


def contenders(args: argparse.Namespace) -> list[Contender]:
    out = [Contender("kvpilot", p) for p in args.kvpilot_policies]
    for router in args.peers:
        out += [Contender(router, p) for p in PEER_POLICIES[router]]
    return out


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workloads", nargs="+", default=["mooncake", "agentic"],
                    help="mooncake (the conversation trace) or a kvpilot.sim.families generator")
    ap.add_argument("--mooncake-rates", type=float, nargs="+", default=[3.0, 6.0], help="modelled req/s")
    ap.add_argument("--agentic-rates", type=float, nargs="+", default=[6.0], help="modelled req/s")
    ap.add_argument("--rates", type=float, nargs="+", help="modelled req/s for every other workload")
    ap.add_argument("--requests", type=int, default=150, help="requests per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=10,
                    help="repeat k replays seed seed + k (Mooncake: the slice from (seed + k) × requests)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--profile", default="h100-llama3-8b")
    ap.add_argument("--time-scale", type=float, default=4.0, help="workers run N× faster than the modelled GPU")
    ap.add_argument("--kv-capacity-tokens", type=int,
                    help="per worker (default: the profile's); smaller makes placement decide what stays cached")
    ap.add_argument("--max-tokens", type=int, default=32, help="output cap per request (TTFT is the measure)")
    ap.add_argument("--slo-ttft", type=float, default=5.0, help="TTFT SLO, modelled seconds")
    ap.add_argument("--kvpilot-policies", nargs="+", default=list(KVPILOT_POLICIES))
    ap.add_argument("--peers", nargs="*", default=list(PEER_POLICIES), choices=list(PEER_POLICIES))
    ap.add_argument("--peers-venv", type=Path, help="default: $KVPILOT_PEERS_VENV or scripts/peers-env.sh's cache")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers", help="writes OUT.json, OUT.md, OUT.png")
    return ap.parse_args(argv)


def rates_for(workload: str, args: argparse.Namespace) -> list[float]:
    by_name = {"mooncake": args.mooncake_rates, "agentic": args.agentic_rates}
    rates = by_name.get(workload) or args.rates
    if not rates:
        raise SystemExit(f"no rates for workload {workload!r}: pass --rates")
    return list(rates)


def save(args: argparse.Namespace, argv: list[str] | None, started: float, load_before: list[float],
         runs: list[Run], complete: bool) -> list[Path]:
    """JSON, markdown and PNG of the runs so far: rewritten after every cell, so a run cut short
    (a shared machine, a deadline) still leaves its finished steps recorded."""
    meta = {"command": " ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
            "minutes": round((time.time() - started) / 60, 1), "loadavg_before": load_before,
            "loadavg_after": loadavg(), "cores": os.cpu_count(), "complete": complete}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in runs]}, indent=1))
    return [path, *write_report(meta, [asdict(r) for r in runs], args.out)]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.peers and args.peers_venv is None:
        args.peers_venv = peers_venv()
        if args.peers_venv is None:
            raise SystemExit("no peers venv: run `bash scripts/peers-env.sh` first (or pass --peers with none)")
    field = contenders(args)
    args.kv_capacity_tokens = args.kv_capacity_tokens or get_profile(args.profile).kv_capacity_tokens
    worker_args = ["--profile", args.profile, "--time-scale", str(args.time_scale),
                   "--kv-capacity-tokens", str(args.kv_capacity_tokens)]
    started, load_before = time.time(), loadavg()
    runs: list[Run] = []
    args.workdir = Path(tempfile.mkdtemp(prefix="kvpilot-peers-"))   # every process's log
    fleet = Fleet(args.workers, worker_args, args.workdir)
    try:
        for workload in args.workloads:
            for rate in rates_for(workload, args):
                for repeat in range(args.repeats):
                    seed = args.seed + repeat
                    try:
                        specs = make_workload(workload, args.requests, rate, seed=seed)
                    except IndexError:   # a trace slice past the trace's end
                        specs = []
                    if len(specs) < args.requests:   # Mooncake's seed k is the slice k × requests on
                        raise SystemExit(f"{workload} seed {seed}: only {len(specs)} requests left in the trace")
                    # The prompts' text, rendered once before any contender runs: rendering them (cached
                    # per block) inside the first replay would slow its client and charge that contender.
                    for spec in specs:
                        spec.text()
                    shift = repeat * len(field) // args.repeats   # each repeat starts elsewhere in the field
                    for c in field[shift:] + field[:shift]:
                        run = measure(c, fleet, specs, args, workload, rate, repeat, seed)
                        runs.append(run)
                        print(f"{workload:9} {rate:5g}/s r{repeat} {c.label:26} in SLO {run.attainment:6.1%} "
                              f"p50 {run.ttft_p50_s:6.2f}s p99 {run.ttft_p99_s:6.2f}s hit {run.hit_rate:6.1%} "
                              f"cpu {run.cpu_s_per_1k:6.1f}s/1k err {run.errors}", flush=True)
                    save(args, argv, started, load_before, runs, complete=False)
    finally:
        fleet.stop()
    for path in save(args, argv, started, load_before, runs, complete=True):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
