"""P and D apart: the P/D workload on a disaggregated pool pair (sim.elastic_pd), each pool sized
by its own kvpilot planner, against fixed sizes. Reports each pool's GPU-hours and which SLO the
missed requests broke (TTFT already at the prefill side: the prefill pool's decisions; TTFT lost
after it: KV transfer and the decode queue; TPOT: the decode pool's).

    .venv/bin/python -P bench/autoscale_pd.py --minutes 30 [--seed 0] [--static 3,2 4,2] [--set mix_jump=4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from kvpilot.autoscaler.baselines import Fixed
from kvpilot.autoscaler.planner import Planner, PlannerConfig, PoolPlanner
from kvpilot.sim.elastic import ElasticConfig
from kvpilot.sim.elastic_pd import ElasticPDCluster

_spec = importlib.util.spec_from_file_location("autoscale", Path(__file__).with_name("autoscale.py"))
assert _spec is not None and _spec.loader is not None
A = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(A)


def run(specs: list[Any], planners: dict[str, Planner], initial: dict[str, int]) -> dict[str, Any]:
    config = ElasticConfig(profile=A.PROFILE, slo_ttft_s=A.TTFT_SLO, slo_tpot_s=A.TPOT_SLO, initial_replicas=1,
                           interval_s=A.INTERVAL, cold_start_s=A.COLD_START, warmup_s=A.WARMUP)
    t0 = time.perf_counter()
    report = ElasticPDCluster(config, planners).run_pd(specs, initial)
    pools = report.pool_decisions or {}
    return {**report.summary, "wall_s": time.perf_counter() - t0,
            "bad_minutes": [(m, a) for m, a in report.minutes() if a < 0.9],
            "timeline": {r: [(d.time, d.asked, d.ready, d.desired) for d in pools[r]] for r in pools}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, default=300.0, help="kvpilot's scale-down window, s")
    ap.add_argument("--static", nargs="*", default=[], metavar="P,D", help="fixed pool sizes to run too")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a PlannerConfig field for both kvpilot planners (repeatable), e.g. mix_jump=4")
    ap.add_argument("--out", type=Path, default=Path("bench/out/autoscale-pd.json"))
    args = ap.parse_args()
    overrides = dict(A._override(kv) for kv in args.set)
    specs = A.WORKLOADS["pd"](args.minutes, args.seed)
    cfg = PlannerConfig(ttft_slo_s=A.TTFT_SLO, tpot_slo_s=A.TPOT_SLO, forecast_s=2 * A.COLD_START + A.INTERVAL,
                        scale_down_window_s=args.window, min_replicas=1, max_replicas=A.MAX_REPLICAS, **overrides)
    rows: dict[str, Any] = {}
    for sizes in args.static:
        p, d = (int(x) for x in sizes.split(","))
        rows[f"static P={p} D={d}"] = run(specs, {"prefill": Fixed(p), "decode": Fixed(d)},
                                          {"prefill": p, "decode": d})
    tag = "".join(f", {k}={v}" for k, v in overrides.items())
    rows[f"kvpilot ({args.window:g}s{tag})"] = run(
        specs, {"prefill": PoolPlanner("prefill", cfg), "decode": PoolPlanner("decode", cfg)},
        {"prefill": 2, "decode": 2})
    for name, r in rows.items():
        print(f"{name}: {r['minutes_within_slo']:.1%} of minutes, {r['gpu_hours']:.2f} GPU-h "
              f"(prefill {r['prefill_gpu_hours']:.2f}, decode {r['decode_gpu_hours']:.2f}); missed requests: "
              f"TTFT at prefill {r['missed_ttft_at_prefill']:.0f}, TTFT after prefill "
              f"{r['missed_ttft_after_prefill']:.0f}, TPOT {r['missed_tpot']:.0f}; bad minutes "
              f"{[m for m, _ in r['bad_minutes']]} ({r['wall_s']:.0f}s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seed": args.seed, "minutes": args.minutes, "rows": rows}, indent=1))
    print(f"raw results: {args.out}")


if __name__ == "__main__":
    main()
