"""The SLO-aware replica planner: pure, per pool, one decision per interval.

Model-based, with no offline profiling. Each pool learns its per-replica capacity online from
its own metrics, taken only from intervals when it met its SLO (so the estimate is "what one
replica sustains within SLO", not "what it does when overloaded"):
- prefill: uncached prompt tokens per second per replica while TTFT p90 ≤ SLO;
- decode: concurrent sequences per replica that fit the TPOT SLO, from the batch and TPOT seen.
Desired replicas = demand / (capacity × headroom), corrected upward when observed attainment
falls short of the target, and at least one more while the SLO is being breached. Prompt demand
counts what piled up unserved (the waiting queue's growth), not only what was computed. Scale-up
acts in one interval; scale-down only when every desired value over the stabilisation window was
lower, and by at most `max_step`. While replicas are still starting, nothing is decided on the
breach they are starting for; only demand beyond what was already asked for adds more. With
missing or stale metrics the size is held, never read as zero load. Replicas that cannot schedule
(no free GPU) are not waited on and not added to: the size is capped where it is. Opt-in, off by default (measured
in bench/results/autoscale.md, session 5): a step-robust trend (`forecast_robust`), a trend followed
only beyond the window's demand range (`forecast_breakout`), and keeping an aggregated pool's
light-load raw prefill rate out of its capacity (`raw_bound_aggregated=False`). Round 3 (same file,
2026-12-02), also opt-in: a reserve for the heaviest prompt mix served recently (`mix_memory_s`), a
mix jump vetoing a scale-down (`mix_jump`), and aggregated pools sized on prefill + decode shares
(`aggregated_work`); those live in `planner_mix`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from kvpilot.autoscaler.planner_mix import median_slope, mix_reserve, mix_shift, shared_need

Role = Literal["prefill", "decode", "aggregated"]


@dataclass(slots=True, frozen=True)
class PoolSignals:
    """One interval's view of a pool. None means the metric was missing or stale."""

    time: float
    current: int                           # replicas asked for
    ready: int                             # replicas serving
    uncached_prompt_tps: float | None      # prefill demand
    running_seqs: float | None             # decode demand (concurrent sequences)
    ttft_p90_s: float | None
    tpot_p90_s: float | None
    attainment: float | None               # share of requests within SLO this interval
    kv_usage: float | None = None          # mean KV-cache usage, 0-1
    waiting: float | None = None           # requests queued in the engines (vllm:num_requests_waiting)
    ttft_p50_s: float | None = None
    first_tokens_per_s: float | None = None  # requests that got their first token, per second
    cached_prompt_tps: float | None = None   # prompt tokens served from the prefix cache, per second
    unschedulable: int = 0                 # asked-for replicas Pending past the deadline (no free GPU)
    ttft_mean_s: float | None = None       # mean TTFT of the requests that got their first token


@dataclass(slots=True, frozen=True)
class PlannerConfig:
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.1
    attainment_target: float = 0.9
    min_replicas: int = 1
    max_replicas: int = 16
    headroom: float = 0.8                  # plan to run replicas at 80% of learned capacity
    scale_down_headroom: float = 0.65      # ...but only shrink to a size that would run at ≤ 65%: hysteresis
    forecast_s: float = 0.0                # plan for demand this far ahead (≈ 2 × cold start + interval)
    forecast_points: int = 3               # intervals the demand trend is fitted over (short: bursts)
    forecast_max_growth: float = 3.0       # a trend is not trusted beyond this factor over current demand
    forecast_confidence: float = 0.0       # follow slope − this × its standard error (0: the fitted slope)
    forecast_robust: bool = False          # median interval slope (needs ≥ 4 points): a step is no trend
    forecast_breakout: bool = False        # follow a trend only above every reading of the last window
    grow_while_starting: bool = True       # demand beyond what starting replicas were asked for adds more
    scale_down_window_s: float = 300.0
    max_step: int = 4                      # most replicas added or removed in one decision
    kv_high: float = 0.9                   # KV usage above this needs another decode replica
    # Priors until the pool has shown what it sustains (h100-llama3-8b-ish):
    prefill_tps_prior: float = 20_000.0
    decode_seqs_prior: float = 64.0
    learn_rate: float = 0.3
    decode_learn_min_seqs: float = 8.0     # too small a batch says little about TPOT at scale
    prefill_utilisation: float = 0.85      # share of a replica's raw prefill rate usable within the TTFT SLO
    raw_bound_aggregated: bool = True      # let an aggregated pool's raw prefill rate raise its capacity too
    mix_jump: float = 0.0                  # prompt tokens per request ≥ this × the window's lowest: the demand's
                                           # mix is shifting; no scale-down, size on it at once (0: off)
    aggregated_work: bool = False          # an aggregated replica's time is shared: size on prefill + decode
                                           # shares of it, not on the larger one alone
    mix_memory_s: float = 0.0              # never shrink below `mix_reserve` × the request rate at the heaviest
    mix_reserve: float = 0.5               # prompt mix seen this long ago (s; 0: off): a mix that came back
                                           # ramps up faster than a cold start


@dataclass(slots=True, frozen=True)
class Plan:
    desired: int
    reason: str


class Planner(Protocol):
    """What every sizing policy (kvpilot's and the baselines) offers its driver."""

    def plan(self, s: PoolSignals) -> Plan: ...


@dataclass
class PoolPlanner:
    role: Role
    config: PlannerConfig = field(default_factory=PlannerConfig)
    prefill_tps: float = 0.0               # learned per-replica capacities
    decode_seqs: float = 0.0
    prefill_raw: float = 0.0               # best lower bound seen on one replica's raw prefill rate
    _history: deque[tuple[float, int]] = field(default_factory=deque)
    _since: float | None = None
    _demand: deque[tuple[float, float]] = field(default_factory=deque)  # (t, external demand)
    _range: deque[tuple[float, float]] = field(default_factory=deque)   # the same, over the window
    _waiting: tuple[float, float] | None = None  # (t, requests waiting) at the last interval
    _mix: deque[tuple[float, float]] = field(default_factory=deque)     # (t, prompt tokens per request)
    _heavy: deque[tuple[float, float]] = field(default_factory=deque)   # the same, over `mix_memory_s`
    last_forecast: tuple[float | None, float | None] = (None, None)  # (prompt tok/s, sequences) last sized for

    def __post_init__(self) -> None:
        self.prefill_tps = self.prefill_tps or self.config.prefill_tps_prior
        self.decode_seqs = self.decode_seqs or self.config.decode_seqs_prior

    # -- learning -----------------------------------------------------------------------------
    def _learn(self, s: PoolSignals) -> None:
        """Per-replica capacity from intervals busy enough to say something about it."""
        c, n = self.config, max(1, s.ready)
        if self.role != "decode" and s.uncached_prompt_tps and s.ttft_p90_s is not None:
            self.prefill_tps = _nudge(self.prefill_tps, s.uncached_prompt_tps / n, s.ttft_p90_s <= c.ttft_slo_s, c)
            raw_ok = self.role == "prefill" or c.raw_bound_aggregated
            if raw_ok and s.first_tokens_per_s and s.ttft_mean_s and s.ttft_p90_s <= c.ttft_slo_s:
                # Each first token took at least its own prompt's prefill, so all prompt tokens over
                # all TTFTs (mean tokens over *mean* TTFT) is a lower bound on the raw prefill rate
                # for any mix (queueing and batching only lower it). Mean tokens over the *median*
                # TTFT is not: in a mix of a few long prompts and many short ones the median is a
                # short prompt's, and the "bound" read 97k tok/s on a replica that computes 33k.
                bound = s.uncached_prompt_tps / s.first_tokens_per_s / s.ttft_mean_s
                self.prefill_raw = max(self.prefill_raw, bound)
                self.prefill_tps = max(self.prefill_tps, self.prefill_raw * c.prefill_utilisation)
        if self.role != "prefill" and s.running_seqs and s.tpot_p90_s:
            per = s.running_seqs / n
            if per >= c.decode_learn_min_seqs:
                # TPOT grows with the batch from a fixed per-step floor, so scaling the batch by the
                # TPOT budget left underestimates what fits within the SLO: a safe capacity.
                implied = per * c.tpot_slo_s / s.tpot_p90_s
                self.decode_seqs += c.learn_rate * (implied - self.decode_seqs)

    # -- planning -----------------------------------------------------------------------------
    def _forecast(self, s: PoolSignals) -> tuple[float | None, float | None]:
        """Demand `forecast_s` ahead by the least-squares trend of the last few intervals; only a
        rising trend is followed (a falling one must prove itself through the scale-down window).
        A replica asked for now serves only after its cold start, and no new decision is taken
        while it starts, so this decision must cover demand until about two cold starts ahead.
        The trend is fitted to the demand that arrives from outside (prompt tokens, or running
        sequences for a decode pool); the other follows it in proportion, because an overloaded
        pool's running-sequence count balloons with its own queue, not with the arrivals."""
        c = self.config
        tps, seqs = self._backlogged(s), s.running_seqs
        driver = tps if self.role != "decode" else seqs
        self._demand.append((s.time, driver or 0.0))
        while len(self._demand) > c.forecast_points:
            self._demand.popleft()
        inside = c.forecast_breakout and self._inside_range(s.time, driver or 0.0)
        if c.forecast_s <= 0 or len(self._demand) < 3 or not driver or inside:
            return tps, seqs
        ts = [d[0] for d in self._demand]
        ys = [d[1] for d in self._demand]
        mean_t, mean_y = sum(ts) / len(ts), sum(ys) / len(ys)
        var = sum((t - mean_t) ** 2 for t in ts)
        if var <= 0:
            return tps, seqs
        slope = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / var
        if c.forecast_robust:
            slope = median_slope(ts, ys)
        if c.forecast_confidence > 0 and len(ys) > 2:
            # Follow a trend only as far as the points bear it out: the slope's lower confidence
            # bound. A clean ramp keeps nearly all of it; a level that jumps around keeps none.
            resid = sum((y - mean_y - slope * (t - mean_t)) ** 2 for t, y in zip(ts, ys, strict=True))
            slope -= c.forecast_confidence * math.sqrt(resid / (len(ys) - 2) / var)
        growth = min(c.forecast_max_growth, 1 + max(0.0, slope) * c.forecast_s / driver)
        if self.role == "aggregated":
            # An aggregated pool's running sequences include prompts still being prefilled; while
            # prompt demand ramps up they pile up with the prefill queue, so scaling them by the
            # same trend counts the ramp twice (it made bursts ask for twice the replicas needed).
            return (tps * growth if tps is not None else None), seqs
        return (tps * growth if tps is not None else None), (seqs * growth if seqs is not None else None)

    def _inside_range(self, t: float, driver: float) -> bool:
        """Whether demand is within the range it already reached over the last scale-down window
        (`forecast_breakout`). Such demand is covered without a forecast: the window holds the
        size its peak asked for, which runs at most at the scale-down headroom. Extrapolating the
        ups and downs inside that range is what made noisy plateaus ask for bursts' worth of
        replicas; a burst or a new daily high shows itself by leaving the range."""
        c = self.config
        while self._range and self._range[0][0] < t - c.scale_down_window_s:
            self._range.popleft()
        prior = max((d for _, d in self._range), default=None)
        self._range.append((t, driver))
        return prior is not None and driver <= prior

    def _backlogged(self, s: PoolSignals) -> float | None:
        """Prompt-token demand including what piled up unserved. An overloaded pool computes only
        what it can, so its computed-token rate flattens exactly when demand runs away; the growth
        of its waiting queue, at the prompt size it serves, is the part it did not compute."""
        tps, last = s.uncached_prompt_tps, self._waiting
        if s.waiting is not None:
            self._waiting = (s.time, s.waiting)
        if tps is None or last is None or s.waiting is None or not s.first_tokens_per_s or s.time <= last[0]:
            return tps
        grew = (s.waiting - last[1]) / (s.time - last[0])
        return tps + max(0.0, grew) * tps / s.first_tokens_per_s

    def _demand_need(self, s: PoolSignals, headroom: float, tps: float | None, seqs: float | None) -> tuple[int, str]:
        """Replicas the demand alone asks for at `headroom` of the learned per-replica capacity."""
        needs: list[tuple[int, str]] = []
        if self.role == "aggregated" and self.config.aggregated_work and tps is not None and seqs is not None:
            return shared_need(s.ready, s.cached_prompt_tps, headroom, tps, seqs, self.prefill_tps, self.decode_seqs)
        if self.role != "decode" and tps is not None:
            cap = self.prefill_tps * headroom
            n = math.ceil(tps / cap)
            why = f"prefill demand {tps:.0f} tok/s over {self.prefill_tps:.0f} tok/s per replica"
            if s.cached_prompt_tps and n > s.ready > 0:
                # New replicas take over about (n - ready)/n of the affinity keys; those prefixes stay
                # cached where they were, so their tokens are computed again until the newcomers warm up.
                extra = s.cached_prompt_tps * (n - s.ready) / n
                n = math.ceil((tps + extra) / cap)
                why += f" + {extra:.0f} tok/s of cache hits lost to remapped keys"
            needs.append((n, why))
        if self.role != "prefill" and seqs is not None:
            n = math.ceil(seqs / (self.decode_seqs * headroom))
            needs.append((n, f"{seqs:.0f} running sequences over {self.decode_seqs:.0f} per replica"))
        return max(needs, key=lambda x: x[0]) if needs else (s.current, "no demand signal")

    def _needed(self, s: PoolSignals, headroom: float, tps: float | None, seqs: float | None) -> tuple[int, str]:
        """The demand's need, raised while the SLO is breached: capacity learned in good times can be
        stale, and attainment below target says by how much."""
        c = self.config
        desired, reason = self._demand_need(s, headroom, tps, seqs)
        breach = self._breach(s)
        if breach:
            if desired <= s.ready:
                desired, reason = s.ready + 1, breach
            if s.attainment is not None and s.attainment < c.attainment_target:
                scaled = math.ceil(desired * (1 + (c.attainment_target - s.attainment)))
                if scaled > desired:
                    desired, reason = scaled, f"{breach}; attainment {s.attainment:.0%} < {c.attainment_target:.0%}"
        if self.role != "prefill" and s.kv_usage is not None and s.kv_usage > c.kv_high and desired <= s.ready:
            desired, reason = s.ready + 1, f"KV usage {s.kv_usage:.0%} > {c.kv_high:.0%}"
        return min(c.max_replicas, max(c.min_replicas, desired)), reason

    def _breach(self, s: PoolSignals) -> str:
        c = self.config
        if self.role != "decode" and s.ttft_p90_s is not None and s.ttft_p90_s > c.ttft_slo_s:
            return f"TTFT p90 {s.ttft_p90_s:.2f}s > SLO {c.ttft_slo_s:.2f}s"
        if self.role != "prefill" and s.tpot_p90_s is not None and s.tpot_p90_s > c.tpot_slo_s:
            return f"TPOT p90 {s.tpot_p90_s * 1e3:.0f}ms > SLO {c.tpot_slo_s * 1e3:.0f}ms"
        return ""

    def _while_starting(self, s: PoolSignals, starting: int) -> Plan:
        """No decision on what the starting replicas are for: the breach they will cure, and capacity
        learned from a pool that is short-handed, both say nothing new. Only demand beyond what the
        replicas already asked for can serve adds more (`grow_while_starting`), so a ramp that
        outgrows the last order is answered within an interval instead of after a cold start."""
        c = self.config
        tps, seqs = self.last_forecast = self._forecast(s)
        if c.grow_while_starting:
            up, reason = self._demand_need(s, c.headroom, tps, seqs)
            up = min(up, c.max_replicas)
            if up > s.current:
                return Plan(min(up, s.current + c.max_step), f"scale up ({starting} still starting): {reason}")
        return Plan(s.current, f"holding: {starting} replica(s) still starting")

    def woke(self) -> None:
        """The pool was woken from zero: what it wanted before says nothing about the demand that
        woke it, so scale-down evidence starts again at its first interval with metrics (a woken
        pool gets a full window of serving before it may go back to zero, however long its cold
        start took, instead of returning there one interval after its first request)."""
        self._history.clear()
        self._since = None

    def plan(self, s: PoolSignals) -> Plan:
        """The size to ask for, capped while GPUs are short: replicas that cannot schedule are not
        "starting" (waiting on them would stall every decision), and asking for more than the
        current size would only queue more pods behind them."""
        stuck = min(s.unschedulable, max(0, s.current - s.ready))   # only not-ready ones can be Pending
        if stuck <= 0:
            return self._plan(s)
        p = self._plan(replace(s, current=s.current - stuck))
        short = f"waiting for GPUs: {stuck} replica(s) unschedulable"
        if p.desired > s.current - stuck:
            # Keep (up to) the pods already asked for: they take the next free GPUs. None beyond.
            wanted = f", {p.desired} wanted" if p.desired > s.current else ""
            return Plan(min(p.desired, s.current), f"{short}{wanted}; {p.reason}")
        if p.desired == s.current - stuck and p.reason.startswith("holding"):
            # No evidence either way (metrics missing, a window still stabilising): releasing the
            # pods already asked for would only ask for them again once the evidence is back.
            return Plan(s.current, f"{short}; {p.reason}")
        return Plan(p.desired, f"{p.reason} ({stuck} unschedulable replica(s) released)")

    def _plan(self, s: PoolSignals) -> Plan:
        c = self.config
        starting = s.current - s.ready
        demand_missing = (self.role != "decode" and s.uncached_prompt_tps is None) or (
            self.role != "prefill" and s.running_seqs is None)
        if demand_missing:
            return Plan(s.current, f"holding: {starting} replica(s) still starting" if starting > 0
                        else "holding: metrics missing or stale")
        if starting > 0:
            return self._while_starting(s, starting)
        self._learn(s)
        shift = mix_shift(self._mix, s.time, s.uncached_prompt_tps, s.first_tokens_per_s, c.mix_jump,
                          c.scale_down_window_s)
        tps, seqs = self.last_forecast = self._forecast(s)
        up, reason = self._needed(s, c.headroom, tps, seqs)
        down, down_reason = self._needed(s, c.scale_down_headroom, s.uncached_prompt_tps, s.running_seqs)
        reserve = mix_reserve(self._heavy, s.time, s.uncached_prompt_tps, s.first_tokens_per_s, c.mix_memory_s,
                              c.mix_reserve)
        if reserve is not None and self.role != "decode":
            kept, why = self._needed(s, c.headroom, reserve, s.running_seqs)
            if kept > down:
                down, down_reason = kept, f"{why} (reserve for the heaviest prompt mix of the last " \
                                          f"{c.mix_memory_s:.0f}s)"
        if self._since is None:
            self._since = s.time
        self._history.append((s.time, max(up, down)))
        while self._history and self._history[0][0] < s.time - c.scale_down_window_s:
            self._history.popleft()
        if up > s.current:
            return Plan(min(up, s.current + c.max_step), f"scale up: {reason}")
        if up < s.current and shift is not None:
            return Plan(s.current, f"holding: demand mix shifting (prompt tokens per request {shift:.1f}× the "
                                   f"window's lowest); {reason}")
        if up < s.current:
            # Down only to the most wanted anywhere in the window (at the stricter scale-down
            # headroom), and by max_step at most.
            floor = max(d for _, d in self._history)
            if s.time - self._since < c.scale_down_window_s:
                floor = s.current  # not yet a full window of evidence
            target = max(floor, s.current - c.max_step)  # floor ≥ min_replicas (see _needed)
            if target < s.current:
                return Plan(target, f"scale down: {down_reason} (stable for {c.scale_down_window_s:.0f}s)")
            return Plan(s.current, f"holding: scale-down stabilising ({down_reason})")
        return Plan(s.current, f"steady: {reason}")


WAKE_REASON = "wake from zero"


def wake_plan(asked: int, held: float, config: PlannerConfig) -> Plan | None:
    """A pool at zero replicas has no engine metrics to plan from; requests the router holds for
    it are the demand. Any held request wakes it to `max(1, min_replicas)`: the first request
    cannot wait for evidence, and more than one cold start's worth is for the planner to decide
    once the woken replica reports. None: not at zero, nothing held, or the pool is capped at 0."""
    if asked > 0 or held <= 0 or config.max_replicas <= 0:
        return None
    n = min(max(1, config.min_replicas), config.max_replicas)
    return Plan(n, f"{WAKE_REASON}: {held:.0f} request(s) held by the router")


def wake_together(asked: dict[str, int], desired: dict[str, int], config: dict[str, PlannerConfig]) -> dict[str, int]:
    """In P/D a request needs both pools: when one pool of a service wakes from zero, every other
    pool of it at zero wakes in the same interval (to its own `max(1, min_replicas)`), rather than
    one cold start after the other. Returns the pools (role → size) to wake besides those already
    waking; pools capped at 0 stay there."""
    if not any(asked[r] == 0 and desired[r] > 0 for r in asked):
        return {}
    return {r: min(max(1, config[r].min_replicas), config[r].max_replicas) for r in asked
            if asked[r] == 0 and desired[r] == 0 and config[r].max_replicas > 0}


def _nudge(estimate: float, observed: float, met_slo: bool, c: PlannerConfig) -> float:
    """Move a per-replica capacity toward an interval's load per replica: up when the pool met
    its SLO while busier than planned, down when it missed the SLO at less than the estimate."""
    if (met_slo and observed > estimate * c.headroom) or (not met_slo and observed < estimate):
        return estimate + c.learn_rate * (observed - estimate)
    return estimate
