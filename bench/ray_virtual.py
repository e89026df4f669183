"""Routers as Ray Serve runs them, in virtual time: seconds of CPU instead of an hour of Ray.

Inside Ray Serve (`kvpilot.ray`) a policy routes without its router-side queues (Serve queues a
request itself) and never sees a first token (the router hears only of completions), so a
request's prefill backlog stays counted until the replica's routing stats show it started and it
had its own predicted prefill time (`StartedBySample`, stats every `--stats-period` s as the live
app's), or until it completes. Serve reports where a request went only after its asynchronous
assignment, so a burst's dispatches (one arrival instant) reach the router once the burst is over.
`ServeQueued` drives a policy that way in the virtual-time cluster, through the Ray router's own
`kvpilot.ray.adapter.PolicyAdapter`, so the live benchmark (`bench/ray_routing.py`) can be
predicted and a policy change tried on many seeds and workloads before an hour of Ray. Mode
`serve-completion` releases the backlog only at completion (no routing stats, as before);
`holding` runs the policy as the proxy does, for comparison.

    .venv/bin/python -P bench/ray_virtual.py --workload agentic --requests 1000 --rates 40 50 \\
        --seeds 0 2 --slo 2 --max-tokens 32 --policies dualmap "dualmap, switch on own TTFT" cache-aware

Prints a Markdown table: share of requests within the TTFT SLO, engine-side hit rate, the share
of requests DualMap sent off their affine candidate ("slo-fallback"), requests per instance.
`--draws N` runs every case under N draws of random replica ids, as Serve names replicas: a ring
policy places by its members' names, so one fixed set of names (the default, as the records
before session 12) is one draw of a distribution that a live run samples anew each deployment.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import string
import sys
from collections import Counter
from collections.abc import Mapping, Sequence, Set
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from kvpilot.ray.adapter import (
    SERVE_DUALMAP,
    STAT_KV_USAGE,
    STAT_RUNNING,
    STAT_SAMPLED_AT,
    STAT_WAITING,
    PolicyAdapter,
    serve_policy,
)
from kvpilot.router.policies import make_policy
from kvpilot.router.policies.cache_aware import CacheAware
from kvpilot.router.policies.dualmap import DualMap
from kvpilot.router.policy import NOTHING, Decision, InstanceLoad, Outcome, Policy, PolicyContext, RequestView
from kvpilot.sim.cluster import Cluster, ClusterConfig, RequestResult, policy_context
from kvpilot.sim.families import make_workload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_quality import ABLATIONS


class ServeQueued:
    """`inner` driven through `kvpilot.ray.adapter.PolicyAdapter`, the Ray router's own mapping, in
    virtual time: the cluster's loads as Ray's queue-length cache before each routing, its engine
    polls as the replicas' routing stats (stamped with the poll's time), dispatches and completions
    as Serve reports them. No `hold`/`release` (the cluster dispatches at once and the engine
    queues) and no first token (the adapter infers when a prefill is done)."""

    def __init__(self, inner: Policy, replica_ids: Mapping[str, str] | None = None, routed_late: bool = True,
                 claim: bool = True) -> None:
        self.inner = inner
        self.name = inner.name
        self.now = 0.0
        self.adapter = PolicyAdapter(inner, clock=lambda: self.now, claim=claim)
        self.ids = dict(replica_ids or {})   # the cluster's instance names → the names the policy sees
        # Serve ranks a request within a millisecond of its arrival but reports where it went only
        # after its asynchronous assignment (`on_request_routed`), so the requests of a burst (same
        # arrival) are all ranked before any is reported. Late: reported once the clock moves on.
        self.routed_late = routed_late
        self._unreported: list[tuple[float, str, str]] = []   # (arrival, request, replica) not yet reported
        self._unreported_at: Counter[str] = Counter()

    def _id(self, name: str) -> str:
        return self.ids.get(name, name)

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        self._report(before=request.arrival)
        self.now = request.arrival   # routed on arrival here
        ids = [self._id(inst.name) for inst in instances]
        self.adapter.set_members(ids)
        for rid, inst in zip(ids, instances, strict=True):   # Serve's queue lengths count only reported sends
            self.adapter.observe(rid, inst.in_flight - self._unreported_at[rid])
        allowed = [rid for rid, inst in zip(ids, instances, strict=True) if inst.name not in excluded]
        ranks = self.adapter.rank_view(request, allowed)
        return Decision(ids.index(ranks[0][0]), self.adapter.last_reason)

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        name = self._id(instances[index].name)
        if not self.routed_late:
            self.adapter.routed(request.request_id, name)
            return
        self._unreported.append((request.arrival, request.request_id, name))
        self._unreported_at[name] += 1

    def _report(self, before: float) -> None:
        """Report the dispatches of arrivals before `before` as routed, each at its arrival time."""
        if not self._unreported or self._unreported[0][0] >= before:
            return
        now = self.now
        keep = []
        for arrival, request_id, name in self._unreported:
            if arrival < before:
                self.now = arrival
                self.adapter.routed(request_id, name)
                self._unreported_at[name] -= 1
            else:
                keep.append((arrival, request_id, name))
        self._unreported = keep
        self.now = now

    def on_poll(self, instances: Sequence[InstanceLoad], t: float) -> None:
        self._report(before=t)
        self.now = t
        for inst in instances:
            self.adapter.observe(self._id(inst.name), inst.in_flight, {
                STAT_RUNNING: inst.engine_running, STAT_WAITING: inst.engine_waiting,
                STAT_KV_USAGE: inst.kv_usage, STAT_SAMPLED_AT: t})

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        """Unseen by a Serve router."""

    def on_complete(self, request: RequestView, outcome: Outcome) -> None:
        self._report(before=float("inf"))   # a completion comes after its request's burst
        self.adapter.completed(request.request_id)

    def cache_estimate(self) -> Any:
        return self.inner.cache_estimate()

    def ring_placement(self) -> Any:
        return self.inner.ring_placement()


# Serve-mode ablations (θ also sets the proxy's holding threshold, so in mode `holding` these are
# not what their names say): where DualMap's hits go inside Serve (bench/results/ray_virtual.md).
SERVE_ABLATIONS: dict[str, dict[str, Any]] = {
    "dualmap, no switch": {"theta": float("inf")},
    "dualmap, theta 0.75": {"theta": 0.75},
    "dualmap, ladder shadow cache": {"shadow_dense": 8, "follow_slos": None},   # Serve's before session 9
    "dualmap, no follow": {"follow_slos": None},                                # Serve's before session 10
    "dualmap, pair places new prefixes": {"follow_share": 0.5, "place_slos": None},   # Serve's in session 11
}
# (Session 10's follow, which moved a request only for 512 tokens' gain within 0.75 × SLO, is gone:
# its numbers are in bench/results/ray_virtual.md.)


# Ray Serve LLM's PrefixCacheAffinityRouter with its defaults (ray 2.5x's `prefix_aware_router.py`,
# read, not copied): no fallback on imbalance (`imbalanced_threshold` is infinite), the replicas
# with the longest prefix match when it covers at least 10% of the prompt, else the replicas with
# the smallest tree, and Serve takes the least queued of them; the tree never evicts
# (`do_eviction` False). That is SGLang's cache-aware rule with those settings, on block hashes:
# a model of the peer for predictions in virtual time; the live benchmark runs the real one.
PREFIX_AFFINITY_MODEL = "prefix-affinity model"


# The peer counts a request (inserts its prompt in its tree) only once Serve reports it routed
# (`on_request_routed`), so its model is driven without claims; DualMap so driven is Serve's DualMap
# before session 14 (`PolicyAdapter.claim`).
DUALMAP_UNCLAIMED = "dualmap, counted when routed"
UNCLAIMED = {PREFIX_AFFINITY_MODEL, DUALMAP_UNCLAIMED}


def prefix_affinity_model(context: PolicyContext) -> Policy:
    return CacheAware(dataclasses.replace(context, kv_capacity_tokens=1 << 40), cache_threshold=0.1 - 1e-9,
                      balance_abs_threshold=1 << 30)


def build(policy: str, context: PolicyContext, serve: bool) -> Policy:
    """The policy as the Ray router builds it (`serve`) or as the proxy does; an ablation changes
    only its own options of that DualMap."""
    if policy == PREFIX_AFFINITY_MODEL:
        return prefix_affinity_model(context)
    if policy == DUALMAP_UNCLAIMED:
        policy = DualMap.name
    if policy.startswith(f"{DualMap.name}:"):   # ad hoc: dualmap:{"follow_slos": 2} over Serve's (the proxy's) options
        return DualMap(context, **{**(SERVE_DUALMAP if serve else {}), **json.loads(policy.split(":", 1)[1])})
    ablation = ABLATIONS.get(policy, SERVE_ABLATIONS.get(policy))
    if ablation is not None:
        return DualMap(context, **{**(SERVE_DUALMAP if serve else {}), **ablation})
    return serve_policy(policy, context) if serve else make_policy(policy, context)


def replica_ids(instances: int, draw: int) -> dict[str, str]:
    """Draw `draw`'s names for the cluster's instances, shaped like the random ids Serve gives
    replicas (8 lowercase letters and digits). A ring policy places prefixes by its members' names,
    so its results vary with them: live, every deployment draws new ones."""
    rng = random.Random(f"replica-ids-{draw}")
    return {f"sim-{i}": "".join(rng.choices(string.ascii_lowercase + string.digits, k=8)) for i in range(instances)}


def run(case: tuple[str, int, float, int, str, str, float, int, int, str, float, int, bool]) -> dict[str, Any]:
    workload, requests, rate, seed, policy, mode, slo, max_tokens, instances, profile, stats_s, draw, routed_late = case
    specs = make_workload(workload, requests, rate, seed)
    if max_tokens:
        specs = [dataclasses.replace(s, max_tokens=min(s.max_tokens, max_tokens)) for s in specs]
    config = ClusterConfig(instances=instances, profile=profile, seed=seed, slo_ttft_s=slo,
                           poll_s=stats_s if mode == "serve" else None)
    serve = mode.startswith("serve")
    inner = build(policy, policy_context(config), serve)
    driven = inner
    if serve:
        driven = ServeQueued(inner, replica_ids(instances, draw) if draw >= 0 else None, routed_late,
                             claim=policy not in UNCLAIMED)
    report = Cluster(config, driven).run(specs)
    results = report.results
    reasons = Counter(r.reason for r in results)
    return {
        "workload": workload, "rate": rate, "seed": seed, "draw": draw, "policy": policy, "mode": mode,
        "in_slo": sum(r.ttft <= slo for r in results) / len(results),
        "hit_rate": sum(r.cached_tokens for r in results) / max(1, sum(r.prompt_tokens for r in results)),
        "switched": reasons.get("slo-fallback", 0) / len(results),
        "per_instance": [s.requests for s in report.instances],
        "placed_run": placed_run(results),
    }


def placed_run(results: Sequence[RequestResult]) -> float:
    """How many new prefixes in a row (in arrival order) were placed on the same instance, on
    average: about 1 where each placement sees the ones before it, more where a burst herds."""
    placed = [r.instance for r in sorted(results, key=lambda r: r.arrival) if r.reason == "placed"]
    runs = sum(1 for i, inst in enumerate(placed) if i == 0 or inst != placed[i - 1])
    return len(placed) / runs if runs else 0.0


def print_summary(rows: list[dict[str, Any]], reference: str) -> None:
    """Per mode and policy: the mean share in SLO and hit rate over every rate and seed, and in how
    many runs each is at least `reference`'s (same mode, rate and seed)."""
    ref = {(r["mode"], r["rate"], r["seed"], r["draw"]): r for r in rows if r["policy"] == reference}
    print(f"| mode | policy | runs | in SLO, mean | hit rate, mean | in SLO ≥ {reference} | hit rate ≥ {reference} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, policy in dict.fromkeys((r["mode"], r["policy"]) for r in rows):
        mine = [r for r in rows if (r["mode"], r["policy"]) == (mode, policy)]
        n = len(mine)
        slo = sum(r["in_slo"] for r in mine) / n
        hit = sum(r["hit_rate"] for r in mine) / n
        peers = [(r, ref.get((mode, r["rate"], r["seed"], r["draw"]))) for r in mine]
        ge_slo = sum(1 for r, p in peers if p is not None and r["in_slo"] >= p["in_slo"])
        ge_hit = sum(1 for r, p in peers if p is not None and r["hit_rate"] >= p["hit_rate"])
        print(f"| {mode} | {policy} | {n} | {slo:.1%} | {hit:.2%} | {ge_slo}/{n} | {ge_hit}/{n} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="agentic")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rates", type=float, nargs="+", default=[40.0, 50.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--slo", type=float, default=2.0)
    ap.add_argument("--max-tokens", type=int, default=32, help="cap on output tokens (0: the workload's)")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--profile", default="h100-llama3-8b")
    ap.add_argument("--policies", nargs="+", default=["dualmap", "cache-aware"],
                    help='registry names, ablations, "prefix-affinity model" (Ray Serve LLM\'s router) or '
                         'dualmap:{JSON options}')
    ap.add_argument("--modes", nargs="+", choices=["serve", "serve-completion", "holding"], default=["serve"])
    ap.add_argument("--stats-period", type=float, default=1.0,
                    help="seconds between Serve's routing stats in mode serve (the live app's default)")
    ap.add_argument("--draws", type=int, default=0,
                    help="run each case under this many draws of random replica ids, as Serve names replicas "
                         "(0: the cluster's fixed names sim-0, sim-1, …, as the records before session 12)")
    ap.add_argument("--routed-at-rank", action="store_true",
                    help="report each dispatch to the router as soon as it is ranked, not once its burst is "
                         "over as Serve does (the records before session 14)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--summary", action="store_true",
                    help="only the mean over rates and seeds per mode and policy, and how often each is "
                         "at least the last policy's (a many-seed comparison)")
    args = ap.parse_args()
    cases = [(args.workload, args.requests, rate, seed, policy, mode, args.slo, args.max_tokens, args.instances,
              args.profile, args.stats_period, draw, not args.routed_at_rank)
             for rate, seed, mode, policy, draw in itertools.product(args.rates, args.seeds, args.modes, args.policies,
                                                                     range(args.draws) if args.draws else [-1])]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, cases))
    print(f"{args.workload}, {args.requests} requests, {args.instances} × {args.profile}, TTFT SLO {args.slo} s")
    print()
    if args.summary:
        print_summary(rows, args.policies[-1])
        return
    print("| req/s | seed | draw | mode | policy | in SLO | hit rate | switched | placed in a row "
          "| requests per instance |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        draw = row["draw"] if row["draw"] >= 0 else "-"
        print(f"| {row['rate']:g} | {row['seed']} | {draw} | {row['mode']} | {row['policy']} | {row['in_slo']:.1%} | "
              f"{row['hit_rate']:.2%} | {row['switched']:.1%} | {row['placed_run']:.1f} | "
              f"{'/'.join(map(str, row['per_instance']))} |")


if __name__ == "__main__":
    main()
