"""Routing decision time: `route()` (the decision) and `route()` + `on_dispatch()` (with the
bookkeeping that follows it: shadow-cache insert, backlog) per request, per policy and cluster size.

    .venv/bin/python -P bench/router_decision.py [--instances 8 128 1000] [--prompt-tokens 1024 32768]
        [--cpu-clock] [--hold]

Requests are Mooncake-like: a shared 512-token head, then a per-conversation prefix drawn from a
Zipf-ish pool (so shadow caches hit), then a unique tail; block hashes are precomputed at the
router's granularity (256-token blocks, at most 256 of them, as the proxy hashes while parsing).
The instance list is one stable list, as the proxy's pool passes it while membership is unchanged.
Each timed call is measured with perf_counter_ns;
the table gives p50/p99 in µs over `--requests` decisions after a warm-up. Goal (router issue):
≤ 20 µs p99 at 1,000 instances, flat in prompt length.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator

from kvpilot.router.policies import make_policy
from kvpilot.router.policy import HoldingPolicy, InstanceLoad, PolicyContext, RequestView
from kvpilot.sim.cluster import percentile
from kvpilot.tokens import segment_block_hashes


def requests(n: int, prompt_tokens: int, seed: int, spread: bool = False) -> Iterator[RequestView]:
    """Made one at a time, as the proxy parses them: a request's hashes live only while it is routed
    (a precomputed list of 20k long prompts would fill the CPU caches with the benchmark's own data).
    `spread`: conversations drawn uniformly from 100,000, so every decision lands on instances
    whose state is as cold as any other's, whatever the prompt length."""
    rng = random.Random(seed)
    for i in range(n):
        convo = rng.randrange(100_000) if spread else int(rng.paretovariate(1.2)) % 5000
        segs = [0, 1_000_000 + convo, 2_000_000 + convo] + [3_000_000 + i * 100 + j for j in range(64)]
        yield RequestView(f"r{i}", prompt_tokens, segment_block_hashes(segs, 512, prompt_tokens, 256)[:256])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, nargs="+", default=[8, 128, 1000])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 32768])
    parser.add_argument("--policies", nargs="+", default=["dualmap", "round-robin", "consistent-hash",
                                                          "cache-aware", "min-ttft"])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time with the thread's CPU clock: on a shared, overloaded machine it leaves out "
                             "the time this process was not running, which otherwise owns the p99")
    parser.add_argument("--spread", action="store_true",
                        help="uniform conversations instead of Zipf-like ones: with Zipf-like keys, short prompts "
                             "(too short for adaptive depth to split hot keys) keep landing on a few instances whose "
                             "state stays in the CPU caches, long ones spread over all; this isolates prompt length")
    parser.add_argument("--hold", action="store_true",
                        help="time the live proxy's holding path instead (DualMap): route, hold in the router-side "
                             "queue, release, dispatch")
    args = parser.parse_args()
    clock = time.thread_time_ns if args.cpu_clock else time.perf_counter_ns
    print("| policy | instances | prompt tokens | decision p50 µs | decision p99 µs | with bookkeeping p50 µs "
          "| with bookkeeping p99 µs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for policy_name in args.policies:
        for n in args.instances:
            for tokens in args.prompt_tokens:
                ctx = PolicyContext(slo_ttft_s=5.0, block_size=256, kv_capacity_tokens=445_000)
                policy = make_policy(policy_name, ctx)
                loads = [InstanceLoad(f"pod-{i}") for i in range(n)]
                holds = args.hold and isinstance(policy, HoldingPolicy)   # (a slow check: not in the timing)
                times, decisions = [], []
                for k, req in enumerate(requests(args.requests + 2000, tokens, seed=n, spread=args.spread)):
                    t0 = clock()
                    d = policy.route(req, loads)
                    t1 = clock()
                    if holds:
                        policy.hold(req, d.index, loads, d.reason)
                        released = policy.release(loads)
                        for view, i, _ in released:
                            policy.on_dispatch(view, i, loads)
                        dt = clock() - t0
                        for view, _, _ in released:
                            policy.on_first_token(view.request_id, 0.1)
                    else:
                        policy.on_dispatch(req, d.index, loads)
                        dt = clock() - t0
                        policy.on_first_token(req.request_id, 0.1)
                    if k >= 2000:
                        times.append(dt / 1000)
                        decisions.append((t1 - t0) / 1000)
                print(f"| {policy_name} | {n} | {tokens} | {percentile(decisions, 50):.1f} | "
                      f"{percentile(decisions, 99):.1f} | {percentile(times, 50):.1f} | {percentile(times, 99):.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
