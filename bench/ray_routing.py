"""Routers side by side inside Ray Serve: Serve's default power of two choices, Ray Serve LLM's
PrefixCacheAffinityRouter and kvpilot's DualMap, on the same simulated replicas and rates.

    .venv/bin/python -P bench/ray_routing.py [--workload mooncake] [--seed 1] [--requests 200]
        [--replicas 4] [--time-scale 0.25] [--rates 4 8] [--repeats 1]
        [--routers pow2 prefix-affinity dualmap] [--max-tokens 32] [--out FILE] [--requests-out FILE]

A local Ray (2 CPUs, loopback) serves `kvpilot.ray.app` (ingress + `--replicas` simulated engines of
the h100-llama3-8b profile), one app per router in turn, redeployed (fresh replicas, empty caches)
for every step and repeat. `--requests` requests of one workload of the family
(`kvpilot.sim.families`: mooncake's slice `--seed`, agentic, chat, rag, no-reuse; each generated in
steady state, so a slice has its reuse) are replayed at each of `--rates` requests per second of
engine time through Serve's HTTP proxy, streaming. The engines run `--time-scale` × real time
(0.25: 4× slower), so the wall request rate is rate × time_scale, well under what two cores push
through Ray (~50 req/s), and Ray's own per-request cost, divided by the same factor in engine time,
stays small next to the engines' TTFTs. The `sched s` and `wall s` columns say whether it did: a
step whose wall time runs far past its arrival schedule measured the machine, not the routers.
TTFT is in engine seconds ((first chunk − sent) × time_scale); the hit rate is the engines' own
(cached / prompt tokens, from each response's usage). `--requests-out` writes one JSON line per
request and step (router, rate, repeat, request id, replica, cached and prompt tokens), to compare
which requests two routers' replicas hit.

Ray Serve LLM's router is imported from its internal path (the public `ray.serve.llm` one needs
vLLM installed; ../shared/guides/ray-serve.md §1). Writes a Markdown table to stdout and `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from kvpilot.demo import RunResult
from kvpilot.demo import replay as demo_replay
from kvpilot.procs import free_port
from kvpilot.ray.app import build_app
from kvpilot.ray.local import LocalRay
from kvpilot.sim.cluster import percentile
from kvpilot.sim.families import make_workload
from kvpilot.sim.workload import RequestSpec

PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router.PrefixCacheAffinityRouter"


@dataclass
class Step:
    router: str
    rate: float
    repeat: int = 0
    sched_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    cached: int = 0
    prompt: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)   # per request: id, replica, cached, prompt
    per_replica: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def row(self, slo: float) -> str:
        n = len(self.ttft) + self.errors
        ok = sum(1 for t in self.ttft if t <= slo) / max(1, n)
        spread = "/".join(str(v) for v in sorted(self.per_replica.values(), reverse=True))
        return (f"| {self.router} | {self.rate:g} | {self.repeat} | {ok:.1%} | {percentile(self.ttft, 50):.2f} | "
                f"{percentile(self.ttft, 90):.2f} | {percentile(self.ttft, 99):.2f} | "
                f"{self.cached / max(1, self.prompt):.2%} | {self.errors} | {spread} | {self.sched_s:.0f} | "
                f"{self.wall_s:.0f} |")


async def replay(url: str, specs: list[RequestSpec], step: Step, time_scale: float, max_tokens: int) -> None:
    """The demo's open-loop client; the Ray app's last event says which replica served and its usage."""
    def account(event: dict[str, Any], spec: RequestSpec) -> None:
        if "kvpilot" in event:
            usage = event["usage"]
            cached, prompt = usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]
            step.cached += cached
            step.prompt += prompt
            replica = event["kvpilot"]["replica"]
            step.per_replica[replica] = step.per_replica.get(replica, 0) + 1
            step.requests.append({"router": step.router, "rate": step.rate, "repeat": step.repeat,
                                  "request": spec.request_id, "replica": replica, "cached": cached,
                                  "prompt": prompt})

    result = RunResult(step.router)
    step.sched_s = (specs[-1].arrival - specs[0].arrival) / time_scale
    t0 = time.monotonic()
    await demo_replay(url, "sim-model", specs, time_scale, 1.0, result, max_tokens=max_tokens,
                      on_event=account)
    step.wall_s = time.monotonic() - t0
    step.ttft.extend(result.ttft)
    step.errors += result.errors


def app_for(router: str, args: argparse.Namespace) -> serve.Application:
    common = {"replicas": args.replicas, "time_scale": args.time_scale, "slo_ttft_s": args.slo,
              "max_ongoing_requests": args.max_ongoing}
    if router == "pow2":
        return build_app(router=None, **common)
    if router == "prefix-affinity":
        return build_app(router=None, router_class=PREFIX_ROUTER, router_kwargs={}, **common)
    return build_app(router=router, router_log_level=args.router_log_level, **common)   # a kvpilot policy by name


def keep_router_log(ray_temp: Path, out: Path) -> None:
    """The router's trace lines from Ray's worker logs, which go with Ray's temporary folder (each
    line is found twice there: `session_latest` links to the session's folder)."""
    lines = {line for log in ray_temp.glob("session_*/logs/worker-*.err")
             for line in log.read_text(errors="replace").splitlines() if " kvpilot.ray " in line}
    out.write_text("\n".join(sorted(lines)) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="mooncake", help="a workload of kvpilot.sim.families")
    ap.add_argument("--seed", type=int, default=1, help="the workload's seed (mooncake: its slice)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--time-scale", type=float, default=0.25)
    ap.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0],
                    help="requests per second of engine time")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--routers", nargs="+", default=["pow2", "prefix-affinity", "dualmap"])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-ongoing", type=int, default=64)
    ap.add_argument("--slo", type=float, default=2.0, help="TTFT SLO, engine seconds")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--requests-out", type=Path, help="one JSON line per request and step")
    ap.add_argument("--router-log-level", help="DEBUG: kvpilot's router logs each decision (Ray's worker logs)")
    args = ap.parse_args()
    for path in ("out", "requests_out"):
        if getattr(args, path):
            setattr(args, path, getattr(args, path).resolve())   # Ray runs in its own temporary folder
    local = LocalRay(num_cpus=2)
    steps: list[Step] = []
    try:
        port = free_port()
        local.start(http_port=port)
        for rate in args.rates:
            specs = make_workload(args.workload, args.requests, rate, args.seed)
            for repeat in range(args.repeats):
                for router in args.routers:   # fresh replicas (empty caches) for every step
                    serve.run(app_for(router, args), name=router, route_prefix=f"/{router}")
                    step = Step(router, rate, repeat)
                    asyncio.run(replay(f"http://127.0.0.1:{port}/{router}", specs, step, args.time_scale,
                                       args.max_tokens))
                    steps.append(step)
                    print(step.row(args.slo), flush=True)
                    serve.delete(router)
    finally:
        try:
            if args.router_log_level and args.out and local.temp:
                keep_router_log(Path(local.temp), args.out.with_suffix(".router.log"))
        finally:
            local.stop()
    load = os.getloadavg()
    lines = [f"{args.workload} (seed {args.seed}), {args.requests} requests, {args.replicas} replicas h100-llama3-8b, "
             f"time scale {args.time_scale}, max_tokens {args.max_tokens}, TTFT SLO {args.slo} s (engine time); "
             f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.", "",
             "| router | req/s | repeat | in SLO | TTFT p50 s | p90 s | p99 s | hit rate | errors "
             "| requests per replica | sched s | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [s.row(args.slo) for s in steps]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.requests_out:
        args.requests_out.write_text("".join(json.dumps(r) + "\n" for s in steps for r in s.requests))


if __name__ == "__main__":
    main()
