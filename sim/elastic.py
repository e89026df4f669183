"""The virtual-time cluster with a changing size: the world the autoscaler benchmarks run in.

One pool of engines (aggregated serving) behind a real routing policy, driven by a real
`Planner` once per interval. Replicas have a life: asked for → starting (a cold start of
`cold_start_s`, paid for in GPU time but not serving) → serving → draining (no new requests;
stops when its last request finishes). The planner sees exactly what the live signals give it:
prompt tokens computed (vLLM's `local_compute` counter), running sequences, TTFT and TPOT
percentiles and SLO attainment over the interval, KV usage and queue length, and how many
replicas are asked for and ready. Steps use the same multi-step plans and truncation as
`sim.cluster`, so a run is exact and fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from kvpilot.autoscaler.planner import Planner, PoolSignals
from kvpilot.router.policies import make_policy
from kvpilot.router.policy import InstanceLoad, PolicyContext, RequestView
from kvpilot.sim.cluster import percentile
from kvpilot.sim.engine import Engine
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.sequence import Sequence
from kvpilot.sim.stepping import STEP, EngineClock, StepLoop
from kvpilot.sim.workload import RequestSpec

_READY, _TICK = 1, 2  # event kinds beside the loop's STEP


@dataclass(slots=True)
class ElasticConfig:
    profile: str = "h100-llama3-8b"
    block_size: int | None = 64          # coarser than the profile's 16: faster, same timing model
    policy: str = "least-loaded"
    seed: int = 0
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    attainment_target: float = 0.9       # a minute is "within SLO" when this share of its requests is
    initial_replicas: int = 1
    interval_s: float = 10.0
    cold_start_s: float = 60.0
    warmup_s: float = 0.0                # minutes starting before this are not scored: no decision can
                                         # have taken effect yet (every run starts at the same size)


@dataclass(slots=True)
class Replica:
    name: str
    clock: EngineClock                   # its engine and the plan it is running
    load: InstanceLoad
    asked_at: float
    ready_at: float
    draining: bool = False
    stopped_at: float | None = None

    @property
    def engine(self) -> Engine:
        return self.clock.engine

    @property
    def alive(self) -> bool:
        return self.stopped_at is None

    def serving(self, now: float) -> bool:
        return self.stopped_at is None and not self.draining and self.ready_at <= now


@dataclass(slots=True, frozen=True)
class Served:
    arrival: float
    ttft: float
    tpot: float | None
    ok: bool
    prefill_ttft: float | None = None    # P/D: arrival to the prefill pool's first token


@dataclass(slots=True, frozen=True)
class ScaleRecord:
    time: float
    asked: int
    ready: int
    desired: int
    reason: str


@dataclass
class ElasticReport:
    config: ElasticConfig
    served: list[Served]
    decisions: list[ScaleRecord]
    gpu_seconds: float
    span_s: float
    summary: dict[str, Any] = field(default_factory=dict)

    def minutes(self) -> list[tuple[int, float]]:
        """(minute, SLO attainment of the requests that arrived in it) for every minute with traffic."""
        buckets: dict[int, list[bool]] = {}
        for r in self.served:
            buckets.setdefault(int(r.arrival // 60), []).append(r.ok)
        return [(m, sum(v) / len(v)) for m, v in sorted(buckets.items())]


class ElasticCluster:
    """Run a trace through a pool whose size a planner sets; see the module docstring."""

    def __init__(self, config: ElasticConfig, planner: Planner) -> None:
        if config.initial_replicas < 1:
            raise ValueError("start with at least one replica")
        self.config = config
        self.planner = planner
        self.profile = get_profile(config.profile)
        self.block_size = config.block_size or self.profile.block_size
        self.policy = make_policy(config.policy, PolicyContext(
            slo_ttft_s=config.slo_ttft_s, block_size=self.block_size,
            kv_capacity_tokens=self.profile.kv_capacity_tokens, seed=config.seed))
        self.replicas: list[Replica] = []
        self.loop = StepLoop()                                   # replica i steps engine i
        self._meta: dict[Sequence, Replica] = {}
        self._served: list[Served] = []
        # Interval accumulators, as the live signals would read them.
        self._ttfts: list[float] = []
        self._tpots: list[float] = []
        self._computed_at_tick = 0
        self._cached_at_tick = 0
        self._last_tick = 0.0

    # -- events --------------------------------------------------------------------------------
    def _finish_step(self, idx: int, t: float) -> None:
        r = self.replicas[idx]
        plan = r.clock.plan
        assert plan is not None
        for seq in r.engine.commit(plan, t):
            self._advanced(idx, seq, t)
        if self.loop.start(idx, t) is None and r.draining:
            r.stopped_at = t                  # drained

    def _advanced(self, idx: int, seq: Sequence, t: float) -> None:
        """`seq` made progress in replica `idx`'s step ending at `t` (P/D overrides it per pool)."""
        if seq.output == 1:
            self.replicas[idx].load.pending_prefill_tokens -= seq.prompt_tokens
            ttft = t - seq.arrival
            self.policy.on_first_token(seq.request_id, ttft)
            self._ttfts.append(ttft)
        if seq.finish_time is not None:
            self._finished(seq, t, self._tpots)

    def _finished(self, seq: Sequence, t: float, tpots: list[float], prefill_ttft: float | None = None) -> None:
        """`seq` finished at `t`: free its place on its replica and score it against the SLOs (TTFT
        to its first token, TPOT over the rest), keeping its TPOT in `tpots` for the next tick.
        Shared by the aggregated pool and P/D's decode pool, so both score requests alike."""
        cfg = self.config
        owner = self._meta.pop(seq)
        owner.load.in_flight -= 1
        ttft = (seq.first_token_time or t) - seq.arrival
        tpot = (t - seq.first_token_time) / (seq.output - 1) \
            if seq.output > 1 and seq.first_token_time is not None else None
        if tpot is not None:
            tpots.append(tpot)
        ok = ttft <= cfg.slo_ttft_s and (tpot is None or tpot <= cfg.slo_tpot_s)
        self._served.append(Served(seq.arrival, ttft, tpot, ok, prefill_ttft))

    def _dispatch(self, spec: RequestSpec, t: float) -> None:
        routable = [(i, r) for i, r in enumerate(self.replicas) if r.serving(t)]
        loads = [r.load for _, r in routable]
        view = RequestView(spec.request_id, spec.prompt_tokens, spec.block_hashes(self.block_size), spec.arrival)
        k = self.policy.route(view, loads).index
        self.policy.on_dispatch(view, k, loads)
        seq = Sequence(spec.request_id, spec.arrival, spec.prompt_tokens, view.block_hashes, spec.max_tokens)
        self._admit(routable[k][0], seq, t, spec.prompt_tokens)

    def _admit(self, idx: int, seq: Sequence, t: float, prefill_tokens: int) -> None:
        """Give `seq` to replica `idx` at `t`, counting it (and the `prefill_tokens` it will
        compute) in the load the routing sees, and wake the replica's engine."""
        r = self.replicas[idx]
        r.engine.add(seq)
        self._meta[seq] = r
        r.load.in_flight += 1
        r.load.pending_prefill_tokens += prefill_tokens
        self.loop.wake(idx, t)

    def _event(self, kind: int, idx: int, t: float) -> None:
        """An event other than a planner tick came due (P/D adds its KV handoffs)."""
        if kind == STEP:
            self._finish_step(idx, t)

    def _idle(self) -> bool:
        """Nothing left in flight: once the trace is over, ticking stops."""
        return not self._meta

    # -- scaling -------------------------------------------------------------------------------
    def _add_replica(self, t: float, cold_start: float) -> None:
        n = self.loop.add(Engine(self.profile, block_size=self.block_size))
        self.replicas.append(Replica(f"sim-{n}", self.loop.clocks[n], InstanceLoad(f"sim-{n}"), t, t + cold_start))
        if cold_start > 0:
            self.loop.push(t + cold_start, _READY, n)

    def _signals(self, t: float) -> PoolSignals:
        dt = t - self._last_tick
        computed = sum(r.engine.counters.prompt_tokens_local_compute for r in self.replicas)
        cached = sum(r.engine.counters.prompt_tokens_local_cache_hit for r in self.replicas)
        s = pool_signals(self.replicas, t, dt, self._ttfts, self._tpots, self.config.slo_ttft_s,
                         (computed - self._computed_at_tick) / dt if dt > 0 else None,
                         (cached - self._cached_at_tick) / dt if dt > 0 else None)
        self._ttfts, self._tpots = [], []
        self._computed_at_tick, self._cached_at_tick, self._last_tick = computed, cached, t
        return s

    # -- the run -------------------------------------------------------------------------------
    def run(self, specs: Seq[RequestSpec]) -> ElasticReport:
        cfg = self.config
        for _ in range(cfg.initial_replicas):
            self._add_replica(0.0, 0.0)
        arrivals = sorted(specs, key=lambda s: s.arrival)
        decisions: list[ScaleRecord] = []

        def tick(t: float) -> None:
            decisions.append(scale_pool(self.replicas, self.planner, self._signals(t), t,
                                        lambda: self._add_replica(t, cfg.cold_start_s)))

        end = self._drive(arrivals, tick)
        for r in self.replicas:
            if r.stopped_at is None:
                r.stopped_at = end
        gpu_s = sum((r.stopped_at or end) - r.asked_at for r in self.replicas)
        report = ElasticReport(cfg, self._served, decisions, gpu_s, end)
        report.summary = summarize(report)
        return report

    def _drive(self, arrivals: Seq[RequestSpec], tick: Callable[[float], None]) -> float:
        """Run the events and the arrivals (sorted) in time order until every request is served,
        calling `tick(t)` every interval for the planners. Returns the time of the last event or
        arrival. The aggregated and the P/D run share it, so both see time pass alike."""
        self.loop.push(self.config.interval_s, _TICK)
        now = 0.0
        for a in range(len(arrivals) + 1):
            # Events up to the next arrival (all of them after the last), then the arrival.
            until = arrivals[a].arrival if a < len(arrivals) else math.inf
            for t, kind, idx in self.loop.due(until):
                now = t
                if kind == _TICK:
                    if a >= len(arrivals) and self._idle():
                        continue                       # all served: stop ticking
                    tick(t)
                    self.loop.push(t + self.config.interval_s, _TICK)
                else:
                    self._event(kind, idx, t)
            if a < len(arrivals):
                now = arrivals[a].arrival
                self._dispatch(arrivals[a], now)
        return max(now, arrivals[-1].arrival if arrivals else 0.0)


def pool_signals(pool: Seq[Replica], t: float, dt: float, ttfts: list[float], tpots: list[float],
                 slo_ttft_s: float, uncached_tps: float | None, cached_tps: float | None = None) -> PoolSignals:
    """What the autoscaler would read of one pool at `t`: sizes from the replicas, load from the
    serving engines, latency from the requests that got their first token in the last `dt`."""
    alive = [r for r in pool if r.alive and not r.draining]
    engines = [r.engine for r in pool if r.alive and r.ready_at <= t]
    return PoolSignals(
        time=t, current=len(alive), ready=sum(1 for r in alive if r.ready_at <= t), uncached_prompt_tps=uncached_tps,
        running_seqs=float(sum(e.num_running for e in engines)),
        ttft_p90_s=percentile(ttfts, 90) if ttfts else None,
        tpot_p90_s=percentile(tpots, 90) if tpots else None,
        attainment=sum(1 for x in ttfts if x <= slo_ttft_s) / len(ttfts) if ttfts else None,
        kv_usage=sum(e.kv_usage() for e in engines) / len(engines) if engines else None,
        waiting=float(sum(e.num_waiting for e in engines)),
        ttft_p50_s=percentile(ttfts, 50) if ttfts else None,
        ttft_mean_s=sum(ttfts) / len(ttfts) if ttfts else None,
        first_tokens_per_s=len(ttfts) / dt if dt > 0 else None,
        cached_prompt_tps=cached_tps)


def scale_pool(pool: Seq[Replica], planner: Planner, signals: PoolSignals, t: float,
               add: Callable[[], None]) -> ScaleRecord:
    """One planner decision for one pool at `t`, carried out by `resize_pool`; returns the record
    the report keeps (the sizes before the decision)."""
    plan = planner.plan(signals)
    alive = sum(1 for r in pool if r.alive and not r.draining)
    ready = sum(1 for r in pool if r.serving(t))
    if plan.desired != alive:
        resize_pool(pool, plan.desired, t, add)
    return ScaleRecord(t, alive, ready, plan.desired, plan.reason)


def resize_pool(pool: Seq[Replica], desired: int, t: float, add: Callable[[], None]) -> None:
    """Take one pool to `desired` replicas: up by taking draining (warm) replicas back first, then
    `add`ing new ones; down by cancelling replicas still starting (youngest first), then draining
    the least busy serving ones (least to lose), always keeping one serving."""
    alive = [r for r in pool if r.alive and not r.draining]
    if desired > len(alive):
        need = desired - len(alive)
        for r in pool:
            if need and r.alive and r.draining:
                r.draining = False
                need -= 1
        for _ in range(need):
            add()
        return
    excess = len(alive) - desired
    starting = sorted((r for r in alive if r.ready_at > t), key=lambda r: -r.asked_at)
    for r in starting[:excess]:
        r.stopped_at = t
        excess -= 1
    serving = sorted((r for r in alive if r.ready_at <= t), key=lambda r: (r.load.in_flight, r.engine.kv_usage()))
    for r in serving[:min(excess, len(serving) - 1)]:
        r.draining = True
        if r.clock.plan is None:
            r.stopped_at = t


def summarize(report: ElasticReport) -> dict[str, Any]:
    served, cfg = report.served, report.config
    minutes = [(m, a) for m, a in report.minutes() if m * 60 >= cfg.warmup_s]
    ttfts = [r.ttft for r in served]
    tpots = [r.tpot for r in served if r.tpot is not None]
    sizes = [d.asked for d in report.decisions]
    return {
        "requests": len(served),
        "slo_attainment": sum(r.ok for r in served) / len(served) if served else math.nan,
        "minutes": len(minutes),
        "minutes_within_slo": sum(1 for _, a in minutes if a >= cfg.attainment_target) / len(minutes)
        if minutes else math.nan,
        "gpu_hours": report.gpu_seconds / 3600,
        "mean_replicas": report.gpu_seconds / report.span_s if report.span_s else math.nan,
        "max_replicas": max(sizes, default=cfg.initial_replicas),
        "scale_events": sum(1 for a, b in zip(report.decisions, report.decisions[1:], strict=False)
                            if b.asked != a.asked),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50), "tpot_p99_s": percentile(tpots, 99),
    }
