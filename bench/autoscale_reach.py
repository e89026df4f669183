"""Round 5: is issue 21's goal within reach of a causal policy? Two parts.

`bound`: arithmetic on the workloads' arrivals, no simulation (seconds).
  - pd: a lower bound on the prefill pool's GPU time for ANY policy (clairvoyant included) that
    keeps every scored minute: each minute's requests, but the 10% with the most prefill work
    (a minute is in SLO when >= 90% of its requests meet TTFT 2 s), must be prefilled within the
    minute plus 2 s, and a replica does at most one GPU-second of the engine model's own prefill
    cost (prompt tokens x `prefill_token_s` + causal attention `attn_pair_s` L^2/2; the step's
    fixed cost left out, so the bound is low) per second; at least one replica always serves.
  - every workload: what holding `k` x the highest prompt-token reading of the last `W` s costs,
    at a generous 25.5k prompt tok/s per replica (integer replicas, >= 1, no cold starts: a floor
    for any policy that keeps such a reserve), for the k that burstgpt's recorded steps need.
`witness`: a two-level causal rule for the P/D prefill pool, run in `sim.elastic_pd`: `high`
  replicas while any prompt-token reading (what the pool computed, a real signal) of the last
  `hold` s was above `theta`, else `low`; the decode pool fixed. Tuned by hand, like static peak.

    .venv/bin/python -P bench/autoscale_reach.py bound
    .venv/bin/python -P bench/autoscale_reach.py witness --seed 1 [--low 2 --high 3 --theta 20000 --hold 120]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
from pathlib import Path
from typing import Any

from kvpilot.autoscaler.baselines import Fixed
from kvpilot.autoscaler.planner import Plan, PoolSignals
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.workload import RequestSpec

_spec = importlib.util.spec_from_file_location("autoscale_pd", Path(__file__).with_name("autoscale_pd.py"))
assert _spec is not None and _spec.loader is not None
PD = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PD)
A = PD.A

# burstgpt's recorded steps (round 4, bench/autoscale_step.py): prompt capacity needed from the
# step's start until an order placed at its first reading serves, and when the step shows.
STEPS = {0: (113_050.0, 240.0), 1: (101_942.0, 720.0)}
REPLICA_TPS = 25_500.0


class TwoLevel:
    """`high` replicas while a prompt-token reading of the last `hold_s` exceeded `theta`, else `low`."""

    def __init__(self, low: int, high: int, theta: float, hold_s: float) -> None:
        self.low, self.high, self.theta, self.hold_s = low, high, theta, hold_s
        self.last_high = -math.inf

    def plan(self, s: PoolSignals) -> Plan:
        if (s.uncached_prompt_tps or 0.0) > self.theta:
            self.last_high = s.time
        n = self.high if s.time - self.last_high <= self.hold_s else self.low
        return Plan(n, f"two-level: last reading above {self.theta:g} at {self.last_high:g}s")


def prefill_s(p: Any, tokens: int) -> float:
    return float(tokens * p.prefill_token_s + p.attn_pair_s * tokens * tokens / 2)


def pd_bound(seed: int, minutes: float) -> dict[str, Any]:
    p = get_profile(A.PROFILE)
    specs: list[RequestSpec] = A.WORKLOADS["pd"](minutes, seed)
    n_min = int(minutes)
    per: list[list[float]] = [[] for _ in range(n_min)]
    for s in specs:
        per[min(n_min - 1, int(s.arrival // 60))].append(prefill_s(p, s.prompt_tokens))
    rows = []
    for m, works in enumerate(per):
        works.sort()
        keep = works[:math.ceil(0.9 * len(works))] if m * 60 >= A.WARMUP else []   # unscored: nothing need be kept
        need = sum(keep) / 62.0                       # replicas on average over the minute (+2 s) at 1 GPU-s/s
        rows.append({"minute": m, "all_gpu_s_per_s": sum(works) / 60, "kept_need": need})
    frac = sum(max(1.0, r["kept_need"]) * 60 for r in rows) / 3600
    integer = sum(max(1, math.ceil(r["kept_need"])) * 60 for r in rows) / 3600
    return {"seed": seed, "minutes": rows, "prefill_lb_fractional_gpu_h": frac,
            "prefill_lb_integer_per_minute_gpu_h": integer}


def prompt_readings(specs: list[RequestSpec], span: float) -> list[float]:
    out = [0.0] * (int(span // A.INTERVAL) + 1)
    for s in specs:
        out[int(s.arrival // A.INTERVAL)] += s.prompt_tokens / A.INTERVAL
    return out


def reserve_cost(readings: list[float], k: float, window_s: float) -> float:
    """GPU-h of holding ceil(k x the highest reading of the last `window_s` / REPLICA_TPS) replicas, >= 1."""
    w = int(window_s // A.INTERVAL)
    total = 0.0
    for i in range(len(readings)):
        peak = max(readings[max(0, i - w):i], default=0.0)
        total += max(1, math.ceil(k * peak / REPLICA_TPS)) * A.INTERVAL
    return total / 3600


def bound(minutes: float) -> dict[str, Any]:
    out: dict[str, Any] = {"pd": [pd_bound(seed, minutes) for seed in (0, 1)]}
    for b in out["pd"]:
        print(f"pd seed {b['seed']}: prefill GPU-h lower bound (any policy, every scored minute): "
              f"{b['prefill_lb_fractional_gpu_h']:.3f} fractional, {b['prefill_lb_integer_per_minute_gpu_h']:.3f} "
              f"with a whole-minute integer size")
        print("  per minute (kept need, replicas): " + " ".join(f"{r['kept_need']:.2f}" for r in b["minutes"]))
    # burstgpt: the reserve each recorded step needs over the highest reading of the last W s.
    windows = (120.0, 300.0, 600.0, 900.0, 1800.0)
    need: dict[float, float] = {}
    for w in windows:
        ks = []
        for seed, (c, t_step) in STEPS.items():
            r = prompt_readings(A.WORKLOADS["burstgpt"](minutes, seed), minutes * 60)
            i = int(t_step // A.INTERVAL)
            m = max(r[max(0, i - int(w // A.INTERVAL)):i])
            ks.append(c / m)
            print(f"burstgpt seed {seed}: step at {t_step:g}s needs {c:,.0f} tok/s; highest reading of the "
                  f"last {w:g}s {m:,.0f}: k = {c / m:.2f}")
        need[w] = max(ks)
    out["k_needed"] = need
    refs = [("ramp", 0, 1.35), ("pd", 0, 1.77), ("pd", 1, 1.81), ("bursty", 0, 4.70)]   # oracle GPU-h on record
    out["reserve_cost"] = {}
    for wl, seed, ref in refs:
        mins = 58.0 if wl == "bursty" else minutes
        r = prompt_readings(A.WORKLOADS[wl](mins, seed), mins * 60)
        for w, k in need.items():
            cost = reserve_cost(r, k, w)
            out["reserve_cost"][f"{wl} s{seed} W={w:g}"] = {"k": k, "gpu_h": cost, "x_ref": cost / ref}
            print(f"{wl} seed {seed}: k = {k:.2f} over the last {w:g}s costs >= {cost:.2f} GPU-h "
                  f"= {cost / ref:.2f}x its oracle ({ref})")
        for w in (300.0, 900.0):
            lo, hi = 0.5, 5.0
            for _ in range(30):
                lo, hi = ((lo + hi) / 2, hi) if reserve_cost(r, (lo + hi) / 2, w) <= 1.15 * ref else (lo, (lo + hi) / 2)
            print(f"{wl} seed {seed}: the largest k within 1.15x its oracle over the last {w:g}s: {lo:.2f}; "
                  f"k = 2.16 costs {reserve_cost(r, 2.16, w) / ref:.2f}x")
    # Does the arrival process give burstgpt away before its step? Index of dispersion of 10-s request counts.
    early = [("burstgpt", 0, minutes, 240.0), ("burstgpt", 1, minutes, 720.0), ("bursty", 0, 58.0, 500.0),
             ("diurnal", 0, 58.0, 240.0), ("ramp", 0, minutes, 240.0), ("pd", 0, minutes, 240.0)]
    for wl, seed, mins, t1 in early:
        counts = [0] * int(t1 // A.INTERVAL)
        for s in A.WORKLOADS[wl](mins, seed):
            if s.arrival < t1:
                counts[int(s.arrival // A.INTERVAL)] += 1
        mean = statistics.mean(counts)
        print(f"{wl} seed {seed}, first {t1:g}s: index of dispersion of 10-s request counts "
              f"{statistics.pvariance(counts) / mean:.2f}")
    return out


def witness(args: argparse.Namespace) -> dict[str, Any]:
    specs = A.WORKLOADS["pd"](args.minutes, args.seed)
    planners = {"prefill": TwoLevel(args.low, args.high, args.theta, args.hold), "decode": Fixed(args.decode)}
    r = PD.run(specs, planners, {"prefill": args.high, "decode": args.decode})
    print(f"pd seed {args.seed}, two-level P {args.low}/{args.high} above {args.theta:g} tok/s held {args.hold:g}s, "
          f"D {args.decode}: {r['minutes_within_slo']:.1%} of minutes, {r['gpu_hours']:.2f} GPU-h "
          f"(prefill {r['prefill_gpu_hours']:.2f}, decode {r['decode_gpu_hours']:.2f}); bad minutes "
          f"{[m for m, _ in r['bad_minutes']]} ({r['wall_s']:.0f}s)")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("bound", "witness"))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--low", type=int, default=2)
    ap.add_argument("--high", type=int, default=3)
    ap.add_argument("--theta", type=float, default=20_000.0)
    ap.add_argument("--hold", type=float, default=120.0)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = bound(args.minutes) if args.what == "bound" else witness(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
