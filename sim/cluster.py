"""The virtual-time cluster: N engines driven by a discrete-event loop, routed by a real policy.

Events are engine step completions; arrivals are merged in time order. An engine whose current
plan covers many identical decode steps is cut short when a request arrives for it, so the run
equals stepping every engine one step at a time, only faster. The router's view of each
instance (`InstanceLoad`) is updated exactly as the live proxy updates it: on dispatch, on the
first token, on completion.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from kvpilot.router.engine_load import EngineSample, observe
from kvpilot.router.policies import make_policy
from kvpilot.router.policy import HoldingPolicy, InstanceLoad, Outcome, Policy, PolicyContext, RequestView
from kvpilot.sim.engine import Engine
from kvpilot.sim.migration_cluster import Rebalancer
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.sequence import Sequence
from kvpilot.sim.stepping import STEP, StepLoop
from kvpilot.sim.workload import RequestSpec

POLL = STEP + 1   # the event kind of a router replica's engine poll


@runtime_checkable
class PollObserver(Protocol):
    """A policy that hears of each engine poll once its view took it (with `poll_s`): the bench's
    Ray Serve emulation reads the polls as Serve's routing stats (`bench/ray_virtual.py`)."""

    def on_poll(self, instances: Seq[InstanceLoad], t: float) -> None: ...


@dataclass(slots=True)
class ClusterConfig:
    instances: int = 8
    profile: str = "h100-llama3-8b"
    block_size: int | None = None       # default: the profile's (16); larger is faster to simulate
    policy: str = "round-robin"
    seed: int = 0
    slo_ttft_s: float = 5.0
    slo_tpot_s: float | None = None
    # Active-active router replicas (router/engine_load.py): each request goes to one at random, as
    # a Service spreads connections; each replica has its own policy and sees the engines' load
    # only through polls every `poll_s` (None: one router with an exact, every-step view).
    replicas: int = 1
    poll_s: float | None = None
    # A KV store every instance saves its prompts' full blocks to and loads from (vLLM with kvpilot's
    # Redis connector): a request's leading blocks another instance prefilled are loaded, each
    # token costing `store_token_cost` of a prefill token (modelled as that share computed).
    shared_store: bool = False
    store_token_cost: float = 0.25
    # The router's cross-instance sharing option (`PolicyContext.shared_store`): its cost model
    # knows about the store. Off with a store: affinity alone, the engines load what they find.
    route_by_store: bool = False
    # The router follows the engines' KV events (router config `kvEvents`): every replica's policy
    # reads what each engine caches instead of its own shadow guess (`EngineCaches`).
    kv_events: bool = False


class EngineCaches:
    """What each simulated instance caches, as vLLM's KV events tell a router that follows them
    (`kvpilot.router.kv_events`): every replica sees the engines' own prefix caches, not only what
    it sent itself. Instant here; live, events lag by a step and a ZMQ hop."""

    def __init__(self, engines: Seq[Engine], block_size: int) -> None:
        self._by_name = {f"sim-{i}": engine for i, engine in enumerate(engines)}
        self.block_size = block_size

    def cached_tokens(self, name: str, request: RequestView) -> int | None:
        engine = self._by_name.get(name)
        if engine is None:
            return None
        hashes = request.block_hashes
        return len(engine.pool.match_prefix(hashes, len(hashes))) * self.block_size


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


def policy_context(config: ClusterConfig) -> PolicyContext:
    """What the cluster's policies know of it; for a policy built outside (an ablation) to see the same."""
    profile = get_profile(config.profile)
    return PolicyContext(slo_ttft_s=config.slo_ttft_s, block_size=config.block_size or profile.block_size,
                         kv_capacity_tokens=profile.kv_capacity_tokens, seed=config.seed,
                         shared_store=config.route_by_store, store_token_cost=config.store_token_cost)


class Cluster:
    rebalancer: Rebalancer | None = None    # live migration / queued moves (sim/migration_cluster.py)

    def __init__(self, config: ClusterConfig, policy: Policy | None = None) -> None:
        if config.instances <= 0:
            raise ValueError("a cluster needs at least one instance")
        self.config = config
        self.profile = get_profile(config.profile)
        self.block_size = config.block_size or self.profile.block_size
        if config.replicas < 1 or (config.replicas > 1 and (policy is not None or config.poll_s is None)):
            raise ValueError("several router replicas need a poll interval and build their own policies")
        if config.route_by_store and not config.shared_store:
            raise ValueError("route_by_store needs a shared store")
        ctx = policy_context(config)
        self.policies = [policy] if policy is not None else [make_policy(config.policy, ctx)
                                                             for _ in range(config.replicas)]
        self.policy = self.policies[0]
        self.engines = [Engine(self.profile, block_size=self.block_size) for _ in range(config.instances)]
        if config.kv_events:
            observed = EngineCaches(self.engines, self.block_size)
            for each in self.policies:
                estimate = each.cache_estimate()
                if estimate is None:
                    raise ValueError(f"policy {config.policy!r} keeps no cache estimate to follow KV events with")
                estimate.follow(observed)
        # Each replica's own view of every instance; `loads` is the first's.
        self.views = [[InstanceLoad(f"sim-{i}") for i in range(config.instances)] for _ in self.policies]
        self.loads = self.views[0]
        self.stats = [InstanceStats(f"sim-{i}") for i in range(config.instances)]
        self._release: Callable[[float], None] | None = None
        self.store: set[int] | None = set() if config.shared_store else None   # block hashes saved

    def _external(self, engine: Engine, hashes: list[int], prompt_tokens: int) -> int:
        """Prompt tokens a request takes from the shared store at `engine`: its leading stored
        blocks beyond the local hit, less the share whose load time is modelled as compute."""
        store = self.store
        if store is None:
            return 0
        limit = min(len(hashes), (prompt_tokens - 1) // self.block_size)
        n = 0
        while n < limit and hashes[n] in store:
            n += 1
        local = len(engine.pool.match_prefix(hashes, limit))
        if n <= local:
            return 0
        return (local + math.floor((n - local) * (1 - self.config.store_token_cost))) * self.block_size

    def run(self, specs: Seq[RequestSpec]) -> ClusterReport:
        engines, views, stats, policies = self.engines, self.views, self.stats, self.policies
        loop = StepLoop()
        for engine in engines:
            loop.add(engine)
        # → (spec, instance, reason, replica, the view its policy routed)
        meta: dict[Sequence, tuple[RequestSpec, int, str, int, RequestView]] = {}
        results: list[RequestResult] = []
        events = 0
        now = 0.0
        poll_s = self.config.poll_s
        pending = len(specs)   # arrivals not yet routed: polls go on until the last is served

        def finish_step(i: int, t: float) -> None:
            plan = loop.clocks[i].plan
            assert plan is not None
            engine = engines[i]
            st = stats[i]
            dur = t - plan.start
            wake: set[int] = set()   # replicas that saw a first token or a finish: they may release
            st.busy_s += dur
            st.kv_usage_s += engine.pool.usage() * dur
            for seq in engine.commit(plan, t):
                if seq.output == 1:  # first token: its prompt is no longer pending prefill
                    if self.store is not None:   # its prompt's full blocks are saved
                        self.store.update(seq.block_hashes)
                    r = meta[seq][3]
                    load = views[r][meta[seq][1]]
                    load.pending_prefill_tokens -= seq.prompt_tokens
                    load.pending_prefill -= 1
                    policies[r].on_first_token(seq.request_id, t - seq.arrival)
                    wake.add(r)
                if seq.finish_time is not None:
                    spec, inst, reason, r, view = meta.pop(seq)
                    wake.add(r)   # a finish frees KV: a request held on the KV budget may go now
                    views[r][inst].in_flight -= 1
                    # Every dispatch ends in one on_complete, as in the proxy (a policy that never
                    # sees a first token, as inside Ray Serve, learns of its prefill only here).
                    policies[r].on_complete(view, Outcome(views[r][inst].name, "ok", prefilled=True))
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
            if poll_s is None:
                views[0][i].kv_usage = engine.pool.usage()  # what the proxy scrapes as vllm:kv_cache_usage_perc
            loop.start(i, t)
            if holding:
                for r in sorted(wake):
                    release(r, t)

        holding = isinstance(policies[0], HoldingPolicy)
        held_specs: dict[str, RequestSpec] = {}

        def dispatch(spec: RequestSpec, view: RequestView, i: int, reason: str, t: float, r: int) -> None:
            loads = views[r]
            policies[r].on_dispatch(view, i, loads)
            # The engine sees the request when it is dispatched (after any router-side queue), so the
            # TTFT fed back to the policy is measured from here, as the live proxy measures it.
            seq = Sequence(spec.request_id, t, spec.prompt_tokens, view.block_hashes, spec.max_tokens,
                           external_tokens=self._external(engines[i], view.block_hashes, spec.prompt_tokens))
            engines[i].add(seq)
            meta[seq] = (spec, i, reason, r, view)
            loads[i].in_flight += 1
            loads[i].pending_prefill_tokens += spec.prompt_tokens
            loads[i].pending_prefill += 1
            st = stats[i]
            st.max_waiting = max(st.max_waiting, engines[i].num_waiting)
            loop.wake(i, t)

        def moved(seq: Sequence, src: int, dst: int, t: float) -> None:
            """A rebalancer moved `seq` from `src` to `dst`: it counts there now; wake `dst`."""
            spec, _, reason, r, view = meta[seq]
            meta[seq] = (spec, dst, reason, r, view)
            loads = views[r]
            loads[src].in_flight -= 1
            loads[dst].in_flight += 1
            if seq.output == 0:
                loads[src].pending_prefill_tokens -= seq.prompt_tokens
                loads[dst].pending_prefill_tokens += seq.prompt_tokens
                loads[src].pending_prefill -= 1
                loads[dst].pending_prefill += 1
            loop.wake(dst, t)

        def release(r: int, t: float) -> None:
            policy = policies[r]
            assert isinstance(policy, HoldingPolicy)
            for view, i, reason in policy.release(views[r], t if poll_s is not None else None):
                dispatch(held_specs.pop(view.request_id), view, i, reason, t, r)

        def poll(t: float) -> None:
            """Every replica polls every engine (what the live router scrapes), then may release."""
            samples = [EngineSample(e.num_running, e.num_waiting, e.pool.usage(), e.pending_prompt_tokens())
                       for e in engines]
            for r, loads in enumerate(views):
                for load, sample in zip(loads, samples, strict=True):
                    observe(load, sample)
                policy = policies[r]
                if isinstance(policy, PollObserver):
                    policy.on_poll(loads, t)
                if holding:
                    release(r, t)
            if poll_s is not None and (pending or held_specs or any(e.has_work for e in engines)):
                loop.push(t + poll_s, POLL)

        def advance(until: float) -> None:
            nonlocal events, now
            for t, kind, i in loop.due(until):
                if kind == POLL:
                    poll(t)
                else:
                    events, now = events + 1, max(now, t)
                    finish_step(i, t)

        self._release = (lambda t: release(0, t)) if holding else None
        if poll_s is not None:
            if self.rebalancer is not None:
                raise ValueError("the rebalancer runs with one router and its exact view")
            loop.push(min((s.arrival for s in specs), default=0.0), POLL)
        pick = random.Random(self.config.seed)
        first = min((s.arrival for s in specs), default=0.0)
        for spec in sorted(specs, key=lambda s: s.arrival):
            arrival = spec.arrival
            advance(arrival)
            now = max(now, arrival)
            pending -= 1
            r = pick.randrange(len(policies)) if len(policies) > 1 else 0
            policy = policies[r]
            view = RequestView(spec.request_id, spec.prompt_tokens, spec.block_hashes(self.block_size), arrival)
            decision = policy.route(view, views[r])
            if holding:
                assert isinstance(policy, HoldingPolicy)
                policy.hold(view, decision.index, views[r], decision.reason)
                held_specs[spec.request_id] = spec
                release(r, arrival)
            else:
                dispatch(spec, view, decision.index, decision.reason, arrival, r)
        advance(math.inf)
        makespan = now - first
        report = ClusterReport(self.config, results, stats, makespan, events)
        report.summary = summarize(results, stats, makespan, self.config.slo_ttft_s, self.config.slo_tpot_s)
        return report
