"""The P/D oracle: the causal meter oracle applied to each pool of the disaggregated pair.

The prefill pool is sized by the oracle rule on the prefill work that arrived (prompt tokens'
prefill, what TTFT depends on), the decode pool on the decode work (each output token at its
context, what TPOT and the KV in use depend on), each with its own utilisation
(`sim.elastic_oracle`). The two utilisations are found by coordinate bisection on the scored run
itself: first the prefill pool's, with the decode pool generous (`--decode-start`), for each of
the prefill hold windows tried (the prefill pool's demand on the P/D workload falls ~20× in the
short-prompt phase, so a 120 s hold leaves one replica for the fade back, which loses a minute at
every utilisation tried down to 0.28: bench/results/autoscale.md, round 4), then the decode pool's with the prefill
pool at the cheapest setting found; both the highest that keep ≥ 99%
of minutes. Like the aggregated oracle it reads arrivals exactly and at once, orders without step
limits, and is tuned in hindsight on the run it is scored on.

`--compare` reads `bench/autoscale_pd.py` outputs and prints each row's GPU-hours per pool and in
total as a ratio to the oracle's.

    .venv/bin/python -P bench/autoscale_pd_bound.py --minutes 30 --seed 0 [--steps 4] \
        [--compare bench/out/pdpools-s0-K.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from kvpilot.sim import elastic_oracle
from kvpilot.sim.elastic_oracle import MeterOracle, bisect_util

_spec = importlib.util.spec_from_file_location("autoscale_pd", Path(__file__).with_name("autoscale_pd.py"))
assert _spec is not None and _spec.loader is not None
PD = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PD)
A = PD.A


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-holds", type=float, nargs="+", default=[300.0, 600.0],
                    help="the prefill oracle's hold windows tried, s (each bisected; the cheapest kept)")
    ap.add_argument("--decode-hold", type=float, default=120.0, help="the decode oracle's hold window, s")
    ap.add_argument("--steps", type=int, default=4, help="bisection steps per pool")
    ap.add_argument("--decode-start", type=float, default=0.6,
                    help="the decode pool's utilisation while the prefill pool's is bisected (generous)")
    ap.add_argument("--decode-hi", type=float, default=3.0,
                    help="the top of the decode bisection (its meter charges each token a 64-batch step share, "
                         "so a decode-only replica can run above 1 of it)")
    ap.add_argument("--compare", type=Path, nargs="*", default=[], help="autoscale_pd.py outputs to put as ratios")
    ap.add_argument("--out", type=Path, default=Path("bench/out/autoscale-pd-bound.json"))
    args = ap.parse_args()
    specs = A.WORKLOADS["pd"](args.minutes, args.seed)
    span = args.minutes * 60
    meters = {part: elastic_oracle.work_meter(specs, span, A.PROFILE, A.INTERVAL, part)
              for part in ("prefill", "decode")}
    rows: list[dict[str, Any]] = []

    def keeps(u_p: float, u_d: float, hold_p: float) -> bool:
        planners = {r: MeterOracle(meters[r], u, hold, A.INTERVAL, A.MAX_REPLICAS)
                    for r, u, hold in (("prefill", u_p, hold_p), ("decode", u_d, args.decode_hold))}
        r = PD.run(specs, planners, {"prefill": 2, "decode": 2})
        r.pop("timeline")
        row = {"util_prefill": u_p, "util_decode": u_d, "hold_prefill_s": hold_p, **r}
        rows.append(row)
        print(f"hold P {hold_p:g}s, util P {u_p:.3f} D {u_d:.3f}: {r['minutes_within_slo']:.1%} of minutes, "
              f"{r['gpu_hours']:.2f} GPU-h "
              f"(prefill {r['prefill_gpu_hours']:.2f}, decode {r['decode_gpu_hours']:.2f}); bad minutes "
              f"{[m for m, _ in r['bad_minutes']]} ({r['wall_s']:.0f}s)", flush=True)
        return bool(r["minutes_within_slo"] >= A.GOAL_MINUTES)

    found: dict[float, float] = {}
    for hold in args.prefill_holds:
        u = bisect_util(lambda u, h=hold: keeps(u, args.decode_start, h), 0.2, 1.5, args.steps)
        if u is not None:
            found[hold] = u
    good = [r for r in rows if r["minutes_within_slo"] >= A.GOAL_MINUTES]
    u_p = u_d = None
    if good:
        first = min(good, key=lambda r: r["prefill_gpu_hours"])
        u_p, hold_p = first["util_prefill"], first["hold_prefill_s"]
        u_d = bisect_util(lambda u: keeps(u_p, u, hold_p), args.decode_start, args.decode_hi, args.steps)
    good = [r for r in rows if r["minutes_within_slo"] >= A.GOAL_MINUTES]
    best = min(good, key=lambda r: r["gpu_hours"]) if good else None
    print(f"P/D oracle (prefill holds kept: {found}; utilisation P {u_p}, D {u_d}): {best}")
    compared: dict[str, Any] = {}
    for path in args.compare:
        for name, r in json.loads(path.read_text())["rows"].items():
            if best is None:
                continue
            ratio = {k: r[f"{k}_gpu_hours"] / best[f"{k}_gpu_hours"] for k in ("prefill", "decode")}
            ratio["total"] = r["gpu_hours"] / best["gpu_hours"]
            compared[f"{path.name}: {name}"] = {"minutes_within_slo": r["minutes_within_slo"], "x_oracle": ratio}
            print(f"{path.name}: {name}: {r['minutes_within_slo']:.1%}, {r['gpu_hours']:.2f} GPU-h = "
                  f"{ratio['total']:.2f}x the P/D oracle (prefill {ratio['prefill']:.2f}x, "
                  f"decode {ratio['decode']:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seed": args.seed, "minutes": args.minutes, "prefill_holds_s": args.prefill_holds,
                                    "decode_hold_s": args.decode_hold, "rows": rows, "best": best,
                                    "compared": compared}, indent=1))
    print(f"raw results: {args.out}")


if __name__ == "__main__":
    main()
