"""The virtual-time cluster: N engines driven by a discrete-event loop, routed by a real policy.

Events are engine step completions; arrivals are merged in time order. An engine whose current
plan covers many identical decode steps is cut short when a request arrives for it, so the run
equals stepping every engine one step at a time, only faster. The router's view of each
instance (`InstanceLoad`) is updated exactly as the live proxy updates it: on dispatch, on the
first token, on completion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass, field
from typing import Any

from kvpilot.router.policies import make_policy
from kvpilot.router.policy import HoldingPolicy, InstanceLoad, Policy, PolicyContext, RequestView
from kvpilot.sim.engine import Engine
from kvpilot.sim.migration_cluster import Rebalancer
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.sequence import Sequence
from kvpilot.sim.stepping import StepLoop
from kvpilot.sim.workload import RequestSpec


@dataclass(slots=True)
class ClusterConfig:
    instances: int = 8
    profile: str = "h100-llama3-8b"
    block_size: int | None = None       # default: the profile's (16); larger is faster to simulate
    policy: str = "round-robin"
    seed: int = 0
    slo_ttft_s: float = 5.0
    slo_tpot_s: float | None = None


@dataclass(slots=True)
class RequestResult:
    request_id: str
    instance: int
    reason: str
    arrival: float
    ttft: float
    tpot: float | None
    e2e: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    preemptions: int


@dataclass(slots=True)
class InstanceStats:
    name: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    max_waiting: int = 0
    busy_s: float = 0.0
    kv_usage_s: float = 0.0             # ∫ KV usage dt, for the time-weighted mean
    preemptions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class ClusterReport:
    config: ClusterConfig
    results: list[RequestResult]
    instances: list[InstanceStats]
    makespan_s: float
    events: int
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self, with_requests: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": asdict(self.config), "summary": self.summary,
            "instances": [{**asdict(s), "hit_rate": s.hit_rate,
                           "mean_kv_usage": s.kv_usage_s / self.makespan_s if self.makespan_s else 0.0}
                          for s in self.instances],
        }
        if with_requests:
            out["requests"] = [asdict(r) for r in self.results]
        return out


def percentile(values: Seq[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(results: Seq[RequestResult], instances: Seq[InstanceStats], makespan: float,
              slo_ttft_s: float, slo_tpot_s: float | None) -> dict[str, Any]:
    ttfts = [r.ttft for r in results]
    tpots = [r.tpot for r in results if r.tpot is not None]
    ok = sum(1 for r in results if r.ttft <= slo_ttft_s and
             (slo_tpot_s is None or r.tpot is None or r.tpot <= slo_tpot_s))
    prompt = sum(r.prompt_tokens for r in results)
    pending = [s.prompt_tokens - s.cached_tokens for s in instances]
    mean_pending = sum(pending) / len(pending) if pending else 0.0
    return {
        "requests": len(results),
        "slo_attainment": ok / len(results) if results else math.nan,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90), "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50), "tpot_p90_s": percentile(tpots, 90), "tpot_p99_s": percentile(tpots, 99),
        "cache_hit_rate": sum(r.cached_tokens for r in results) / prompt if prompt else 0.0,
        # Imbalance of computed prefill work across instances: max over mean.
        "load_imbalance": max(pending) / mean_pending if mean_pending else math.nan,
        "throughput_rps": len(results) / makespan if makespan else math.nan,
        "output_tokens_per_s": sum(r.output_tokens for r in results) / makespan if makespan else math.nan,
        "preemptions": sum(r.preemptions for r in results),
        "makespan_s": makespan,
    }


class Cluster:
    rebalancer: Rebalancer | None = None    # live migration / queued moves (sim/migration_cluster.py)

    def __init__(self, config: ClusterConfig, policy: Policy | None = None) -> None:
        if config.instances <= 0:
            raise ValueError("a cluster needs at least one instance")
        self.config = config
        self.profile = get_profile(config.profile)
        self.block_size = config.block_size or self.profile.block_size
        self.policy = policy or make_policy(config.policy, PolicyContext(
            slo_ttft_s=config.slo_ttft_s, block_size=self.block_size,
            kv_capacity_tokens=self.profile.kv_capacity_tokens, seed=config.seed))
        self.engines = [Engine(self.profile, block_size=self.block_size) for _ in range(config.instances)]
        self.loads = [InstanceLoad(f"sim-{i}") for i in range(config.instances)]
        self.stats = [InstanceStats(f"sim-{i}") for i in range(config.instances)]
        self._release: Callable[[float], None] | None = None

    def run(self, specs: Seq[RequestSpec]) -> ClusterReport:
        engines, loads, stats, policy = self.engines, self.loads, self.stats, self.policy
        loop = StepLoop()
        for engine in engines:
            loop.add(engine)
        meta: dict[Sequence, tuple[RequestSpec, int, str]] = {}
        results: list[RequestResult] = []
        events = 0
        now = 0.0

        def finish_step(i: int, t: float) -> None:
            plan = loop.clocks[i].plan
            assert plan is not None
            engine = engines[i]
            st = stats[i]
            dur = t - plan.start
            wake = False   # a first token or a finish: held requests may be released
            st.busy_s += dur
            st.kv_usage_s += engine.pool.usage() * dur
            for seq in engine.commit(plan, t):
                if seq.output == 1:  # first token: its prompt is no longer pending prefill
                    loads[i].pending_prefill_tokens -= seq.prompt_tokens
                    policy.on_first_token(seq.request_id, t - seq.arrival)
                    wake = True
                if seq.finish_time is not None:
                    wake = True   # a finish frees KV: a request held on the KV budget may go now
                    spec, inst, reason = meta.pop(seq)
                    loads[inst].in_flight -= 1
                    ttft = (seq.first_token_time or t) - spec.arrival
                    tpot = (t - seq.first_token_time) / (seq.output - 1) if seq.output > 1 and seq.first_token_time \
                        is not None else None
                    results.append(RequestResult(spec.request_id, inst, reason, spec.arrival, ttft, tpot,
                                                 t - spec.arrival, seq.prompt_tokens, seq.output,
                                                 seq.cached_tokens, seq.preemptions))
                    st.requests += 1
                    st.prompt_tokens += seq.prompt_tokens
                    st.cached_tokens += seq.cached_tokens
                    st.preemptions += seq.preemptions
            if self.rebalancer is not None:
                self.rebalancer.on_step(i, t, plan, engines, moved)
            loads[i].kv_usage = engine.pool.usage()  # what the proxy scrapes as vllm:kv_cache_usage_perc
            loop.start(i, t)
            if wake and self._release is not None:
                self._release(t)

        holding = isinstance(policy, HoldingPolicy)
        held_specs: dict[str, RequestSpec] = {}

        def dispatch(spec: RequestSpec, view: RequestView, i: int, reason: str, t: float) -> None:
            policy.on_dispatch(view, i, loads)
            # The engine sees the request when it is dispatched (after any router-side queue), so the
            # TTFT fed back to the policy is measured from here, as the live proxy measures it.
            seq = Sequence(spec.request_id, t, spec.prompt_tokens, view.block_hashes, spec.max_tokens)
            engines[i].add(seq)
            meta[seq] = (spec, i, reason)
            loads[i].in_flight += 1
            loads[i].pending_prefill_tokens += spec.prompt_tokens
            st = stats[i]
            st.max_waiting = max(st.max_waiting, engines[i].num_waiting)
            loop.wake(i, t)

        def moved(seq: Sequence, src: int, dst: int, t: float) -> None:
            """A rebalancer moved `seq` from `src` to `dst`: it counts there now; wake `dst`."""
            spec, _, reason = meta[seq]
            meta[seq] = (spec, dst, reason)
            loads[src].in_flight -= 1
            loads[dst].in_flight += 1
            if seq.output == 0:
                loads[src].pending_prefill_tokens -= seq.prompt_tokens
                loads[dst].pending_prefill_tokens += seq.prompt_tokens
            loop.wake(dst, t)

        def release(t: float) -> None:
            assert isinstance(policy, HoldingPolicy)
            for view, i, reason in policy.release(loads):
                dispatch(held_specs.pop(view.request_id), view, i, reason, t)

        self._release = release if holding else None
        for spec in sorted(specs, key=lambda s: s.arrival):
            arrival = spec.arrival
            for t, _, i in loop.due(arrival):
                events += 1
                finish_step(i, t)
            now = max(now, arrival)
            view = RequestView(spec.request_id, spec.prompt_tokens, spec.block_hashes(self.block_size), arrival)
            decision = policy.route(view, loads)
            if holding:
                assert isinstance(policy, HoldingPolicy)
                policy.hold(view, decision.index, loads, decision.reason)
                held_specs[spec.request_id] = spec
                release(arrival)
            else:
                dispatch(spec, view, decision.index, decision.reason, arrival)
        for t, _, i in loop.due(math.inf):
            events += 1
            now = t
            finish_step(i, t)
        makespan = now - (min(s.arrival for s in specs) if specs else 0.0)
        report = ClusterReport(self.config, results, stats, makespan, events)
        report.summary = summarize(results, stats, makespan, self.config.slo_ttft_s, self.config.slo_tpot_s)
        return report
