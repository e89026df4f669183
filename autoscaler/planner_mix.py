"""The planner's opt-in sizing refinements, kept apart from `planner` so it stays readable: the
demand-mix reserve (`mix_memory_s`) and jump (`mix_jump`), an aggregated pool sized on shared
prefill + decode work (`aggregated_work`), and the step-robust trend slope (`forecast_robust`).
Each is a pure function of the interval's signals, the config and the planner's own memory
(passed in as plain values: `planner` imports this module, so this one imports nothing of it),
measured in bench/results/autoscale.md (session 5 and round 3).
"""

from __future__ import annotations

import math
import statistics
from collections import deque


def shared_need(ready: int, cached_tps: float | None, headroom: float, tps: float, seqs: float,
                prefill_tps: float, decode_seqs: float) -> tuple[int, str]:
    """An aggregated replica both prefills and decodes, one step at a time: the prefill tokens a
    step carries lengthen every decoding sequence's step, and the sequences it decodes take
    time from prefill. So a pool's work is the prefill share (tokens over what a replica
    prefills alone, `prefill_tps`) plus the decode share (sequences over what fits the TPOT SLO
    alone, `decode_seqs`), and the replicas needed are their sum, not the larger one: the
    prefill capacity that counts is what is left beside the decode load, not what a lightly
    loaded replica showed. `ready`: replicas serving; `cached_tps`: prompt tokens/s served from
    the prefix cache."""
    prefill = tps / prefill_tps
    if cached_tps and ready > 0:
        n = math.ceil((prefill + seqs / decode_seqs) / headroom)
        if n > ready:   # remapped keys' cache hits are computed again (see PoolPlanner._demand_need)
            prefill += cached_tps * (n - ready) / n / prefill_tps
    decode = seqs / decode_seqs
    n = math.ceil((prefill + decode) / headroom)
    return n, (f"prefill demand {tps:.0f} tok/s over {prefill_tps:.0f} tok/s per replica "
               f"({prefill:.2f} replicas) + {seqs:.0f} running sequences over {decode_seqs:.0f} "
               f"({decode:.2f}): shared")


def mix_shift(window: deque[tuple[float, float]], t: float, prompt_tps: float | None, first_tps: float | None,
              jump: float, window_s: float) -> float | None:
    """The demand's mix moving (`mix_jump` = `jump`): prompt tokens per request this interval
    (`prompt_tps` over `first_tps`, first tokens per second) over the lowest of the last
    scale-down window (`window_s`; `window`, updated here), when at least `jump`.
    Request rates can stay flat while each request brings ten times the prompt (a chat phase
    giving way to long documents): the size the window held for the old mix says nothing about
    the new one, so a shift vetoes scaling down. None: no shift, or too few requests to say."""
    if jump <= 0 or not prompt_tps or not first_tps or first_tps < 0.5:
        return None
    mix = prompt_tps / first_tps
    while window and window[0][0] < t - window_s:
        window.popleft()
    low = min((m for _, m in window), default=None)
    window.append((t, mix))
    return mix / low if low and mix >= jump * low else None


def mix_reserve(heavy: deque[tuple[float, float]], t: float, prompt_tps: float | None, first_tps: float | None,
                memory_s: float, reserve: float) -> float | None:
    """Prompt tokens/s to keep capacity for (`mix_memory_s` = `memory_s`): `reserve` × this
    interval's request rate (`first_tps`) × the most prompt tokens per request of any interval in
    the memory (`heavy`, updated here). A service whose prompts were long a few minutes ago can turn long again
    within one interval, with the request rate unchanged; a pool sized for the short mix then
    has one cold start of the long one's ramp to serve alone (pd: a tenfold ramp in 120 s, one
    replica, a minute lost whatever is ordered once it shows). Only scale-downs are held to it:
    it never adds replicas."""
    if memory_s <= 0 or not prompt_tps or not first_tps:
        return None
    while heavy and heavy[0][0] < t - memory_s:
        heavy.popleft()
    if first_tps >= 0.5:          # too few requests say nothing about the mix
        heavy.append((t, prompt_tps / first_tps))
    if not heavy:
        return None
    return reserve * first_tps * max(m for _, m in heavy)


def median_slope(ts: list[float], ys: list[float]) -> float:
    """The median of the interval-to-interval slopes. A ramp rises in most intervals and keeps its
    slope; a level that stepped once is one rise among flat intervals, so it reads as a new level
    to follow rather than a trend to extrapolate two cold starts ahead (a least-squares line
    through the same points is steep)."""
    slopes = [(y1 - y0) / (t1 - t0) for t0, y0, t1, y1 in zip(ts, ys, ts[1:], ys[1:], strict=False) if t1 > t0]
    return statistics.median(slopes) if slopes else 0.0
