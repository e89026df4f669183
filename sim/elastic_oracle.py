"""The causal meter oracle's pure parts, for the aggregated pool and for a P/D pool pair.

The benchmark's reference cost (`bench/autoscale_bound.py --oracle meter`, and
`bench/autoscale_pd_bound.py` for P/D) is a policy that reads the *work* that arrived, exactly
and at once, and holds enough replicas for the highest of it over a short window. Work is
GPU-seconds per second from the profile's own step model, so it is comparable across workloads
and needs no workload shape. On a disaggregated pair the same rule is applied to each pool with
its own share of the work: prompt tokens' prefill for the prefill pool (which bounds TTFT), and
each output token's decode at its context for the decode pool (which bounds TPOT). Kept here,
not in bench/, so the split can be unit-tested; the benchmark only bisects its utilisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kvpilot.autoscaler.planner import Plan, PoolSignals
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.workload import RequestSpec

Part = Literal["all", "prefill", "decode"]
DECODE_BATCH = 64   # the step's fixed cost is charged to each decode token shared by this many


def work_meter(specs: list[RequestSpec], span_s: float, profile: str, interval_s: float,
               part: Part = "all") -> list[float]:
    """GPU-seconds of work per second that *arrived* in each interval: each prompt token's
    prefill (part "prefill"), each output token's decode at its mean context with the step's
    fixed cost shared by a batch of `DECODE_BATCH` (part "decode"), or both ("all", the
    aggregated pool's meter). The work lands when its request arrives, so the meter is exact
    and instant: no real pool reads that, which is what makes it an oracle."""
    p = get_profile(profile)
    out = [0.0] * (int(span_s // interval_s) + 2)
    for s in specs:
        ctx = s.prompt_tokens + s.max_tokens / 2
        decode = s.max_tokens * (p.decode_seq_s + p.decode_ctx_s * ctx + p.step_s / DECODE_BATCH)
        prefill = s.prompt_tokens * p.prefill_token_s
        work = prefill + decode if part == "all" else prefill if part == "prefill" else decode
        out[int(s.arrival // interval_s)] += work / interval_s
    return out


@dataclass
class MeterOracle:
    """Every interval, enough replicas for the highest work that arrived over the last `hold_s`
    at utilisation `util`, ordered at once (no step limit), within [1, `max_replicas`]. Its
    inputs (the exact meter, a `util` tuned in hindsight on the run it is scored on) are what a
    real policy lacks; it needs no future, so it is causal."""

    meter: list[float]
    util: float
    hold_s: float
    interval_s: float = 10.0
    max_replicas: int = 32

    def plan(self, s: PoolSignals) -> Plan:
        i = int(s.time // self.interval_s)
        k = max(1, int(self.hold_s // self.interval_s))
        peak = max(self.meter[max(0, i - k):i], default=0.0)
        return Plan(min(self.max_replicas, max(1, math.ceil(peak / self.util))), f"{peak:.2f} GPU-s/s arrived")


def bisect_util(keeps: Callable[[float], bool], lo: float, hi: float, steps: int) -> float | None:
    """The highest utilisation found in `steps` bisection steps on [lo, hi] for which `keeps`
    (a run at that utilisation keeps the goal) holds, or None if none tried did. Bisection
    assumes that a lower utilisation (more replicas) keeps whatever a higher one keeps."""
    best = None
    for _ in range(steps):
        u = (lo + hi) / 2
        if keeps(u):
            lo, best = u, u
        else:
            hi = u
    return best
