"""How cheap can a causal autoscaler be on the bursty workload? A bound by oracle simulation.

`bench/autoscale.py`'s bursty workload is the superposed Azure conversation trace (the *base*)
plus three injected bursts. An autoscaler that cannot see a burst before it starts must hold,
at every moment a burst could start, enough serving replicas to carry the burst's first
detection delay + cold start on their own. This script measures that floor on the benchmark's
own trace and profile, in the same virtual-time world (`sim.elastic`), with a policy that is
given every advantage a causal policy could have and more:

- it knows the base's whole range in advance, and reads the *arrivals* (prompt tokens that
  arrived in the last 10 s; a real pool only sees what it computed);
- it calls a burst the first time a reading exceeds a threshold θ; at θ = the base's highest
  10-s reading it never raises a false alarm; lower θ calls bursts earlier and pays for every
  false alarm by holding the burst size for one cold start + interval;
- once a burst is called it knows its shape: it orders `burst` replicas at once (no step limit)
  and holds them until the burst's ramp down, then steps down with the ramp to the burst's end;
- outside bursts it holds a constant `hold` replicas (the base never needs more than 3).

For each θ and burst size it tries `hold` upwards until every minute is within SLO (the goal's
≥ 99% of 58 minutes allows no missed minute) and reports the cheapest run that keeps them all.
Since a causal policy does not know when the next burst starts, it must hold that many whenever
the base is at the level it was at the onsets (the three onsets sit at the base's typical
level), so `hold` × span is a floor on its GPU time before any burst is served, and the
cheapest run is what the best such policy spends (results: bench/results/autoscale.md).

The diurnal workload has no injected bursts, but one step of its own (minute 45: ≈ 3× within
one compressed ServeGen window) that only the static peak's full size carries through a cold
start. `--workload diurnal` finds that step (the minute one replica fewer than the static peak
loses) and prices the family of policies that hold k × the highest demand read over the last W
seconds (what a scale-down window does), with k just large enough to have the static peak's
size at the step: the mean of that rolling maximum over the day, over its value at the step,
is the share of the static peak's GPU time such a policy spends even with instant starts.

Every other workload (and any of them with `--oracle meter`) gets the workload-agnostic causal
oracle, `MeterOracle`: each interval it holds enough replicas for the highest *work* (GPU-seconds
per second, from the profile's step model) that arrived over the last `hold` seconds, at a
utilisation found by bisection as the highest that keeps ≥ 99% of minutes. It reads arrivals
exactly and at once, orders without step limits, and is tuned in hindsight on the run it is
scored on. It knows nothing of a workload's shape, so on bursty the onset oracle is cheaper.

    .venv/bin/python -P bench/autoscale_bound.py --workload pd --oracle meter --minutes 30 [--seed 0]
    .venv/bin/python -P bench/autoscale_bound.py [--holds 4 5] [--quantiles 1.0 0.9] [--bursts 8 8,7,8]
                     [--plateau 7] [--static-gpu-h 6.79]
    .venv/bin/python -P bench/autoscale_bound.py --workload diurnal [--static-replicas 9]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from kvpilot.autoscaler.baselines import Fixed
from kvpilot.autoscaler.planner import Plan, PoolSignals
from kvpilot.sim import elastic_oracle
from kvpilot.sim.workload import RequestSpec, azure_conv, superpose

# The benchmark's own world and workload (bench/ is not a package; `python -P` keeps it off sys.path).
_spec = importlib.util.spec_from_file_location("autoscale", Path(__file__).with_name("autoscale.py"))
assert _spec is not None and _spec.loader is not None
A = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(A)
COLD_START, GOAL_MINUTES, INTERVAL, MAX_REPLICAS = A.COLD_START, A.GOAL_MINUTES, A.INTERVAL, A.MAX_REPLICAS
bursty, run, static_peak = A.bursty, A.run, A.static_peak
BURSTS = (0.15, 0.45, 0.75)   # bursty(): onsets as shares of the span, 360 s long, 120 s ramps
RAMP_S = 120.0
DRAIN_S = 60.0                # --plateau: how long the ordered replicas serve the onset's backlog first


def readings(specs: list[RequestSpec], span_s: float) -> list[float]:
    """Prompt tokens per second that arrived in each 10-s window: what a perfect meter reads."""
    out = [0.0] * (int(span_s // INTERVAL) + 2)
    for s in specs:
        out[int(s.arrival // INTERVAL)] += s.prompt_tokens / INTERVAL
    return out


@dataclass
class OnsetOracle:
    """Holds `hold` replicas; `burst` from the first reading above `threshold` inside a burst
    (`plateau` once the replicas ordered then have served 60 s), falling back with the burst's
    ramp down; on a reading above `threshold` outside any burst (a false alarm), the largest
    `burst` for one cold start + interval."""

    hold: int
    burst: tuple[int, ...]                  # replicas ordered for each burst (one value: for all)
    threshold: float
    meter: list[float]
    bursts: list[tuple[float, float]]       # (start, end) s
    plateau: int | None = None              # size once the onset's backlog is served (None: `burst`)
    _called: dict[int, float] | None = None
    _alarm_until: float = -1.0

    def plan(self, s: PoolSignals) -> Plan:
        called = self._called if self._called is not None else {}
        self._called = called
        i = int(s.time // INTERVAL) - 1       # the window that just ended
        reading = self.meter[i] if 0 <= i < len(self.meter) else 0.0
        for k, (start, end) in enumerate(self.bursts):
            if start <= s.time < end:
                if reading > self.threshold:
                    called.setdefault(k, s.time)
                if k in called:
                    # It knows the burst's shape from here on: the last ramp-length of it falls back
                    # linearly to the base, and so does what it holds.
                    left = min(1.0, (end - s.time) / RAMP_S)
                    size = self.burst[min(k, len(self.burst) - 1)]
                    if self.plateau is not None and s.time >= called[k] + COLD_START + DRAIN_S:
                        size = min(size, self.plateau)
                    return Plan(self.hold + math.ceil((size - self.hold) * left), f"burst {k} called")
                return Plan(self.hold, f"burst {k} not yet distinguishable ({reading:.0f} tok/s)")
        if reading > self.threshold:
            self._alarm_until = s.time + COLD_START + INTERVAL
        if s.time < self._alarm_until:
            return Plan(max(self.burst), "false alarm")
        return Plan(self.hold, "holding")


def work_meter(specs: list[RequestSpec], span_s: float) -> list[float]:
    """GPU-seconds of work per second that *arrived* in each 10-s window (`sim.elastic_oracle`)."""
    return elastic_oracle.work_meter(specs, span_s, A.PROFILE, INTERVAL)


def MeterOracle(meter: list[float], util: float, hold_s: float) -> elastic_oracle.MeterOracle:
    """The workload-agnostic causal oracle (`sim.elastic_oracle.MeterOracle`) in this world."""
    return elastic_oracle.MeterOracle(meter, util, hold_s, INTERVAL, MAX_REPLICAS)


def meter_oracle(console: Console, specs: list[RequestSpec], minutes: float, holds: list[float],
                 steps: int) -> dict[str, Any]:
    """For each hold, the highest utilisation that keeps ≥ 99% of minutes (bisection), and the
    cheapest such run over all holds: the workload's reference causal cost."""
    meter = work_meter(specs, minutes * 60)
    rows: list[dict[str, Any]] = []
    for hold in holds:
        lo, hi = 0.2, 1.5          # lo keeps every minute on every workload here; hi keeps none
        good: dict[str, Any] | None = None
        for _ in range(steps):
            u = (lo + hi) / 2
            rep = run(specs, MeterOracle(meter, u, hold), 2)
            s = rep.summary
            ok = s["minutes_within_slo"] >= GOAL_MINUTES
            console.print(f"  hold {hold:g}s, util {u:.3f}: {s['minutes_within_slo']:.1%} of minutes, "
                          f"{s['gpu_hours']:.2f} GPU-h")
            row = {"hold_s": hold, "util": u, "minutes_within_slo": s["minutes_within_slo"],
                   "gpu_hours": s["gpu_hours"], "mean_replicas": s["mean_replicas"],
                   "bad_minutes": [m for m, a in rep.minutes() if a < 0.9]}
            rows.append(row)
            if ok:
                lo, good = u, row
            else:
                hi = u
        console.print(f"hold {hold:g}s: cheapest keeping ≥ 99%: {good}")
    good_rows = [r for r in rows if r["minutes_within_slo"] >= GOAL_MINUTES]
    best = min(good_rows, key=lambda r: r["gpu_hours"]) if good_rows else None
    return {"rows": rows, "best": best}


def diurnal_family(console: Console, minutes: float, static_n: int | None) -> dict[str, Any]:
    """The window-hold family's price of carrying the diurnal workload's step; see the docstring."""
    specs = A.daily(minutes)
    if static_n is None:
        static_n, _ = static_peak(specs, console, hi=MAX_REPLICAS // 2)
    short = run(specs, Fixed(static_n - 1), static_n - 1)
    lost = [m for m, a in short.minutes() if a < 0.9]
    meter = readings(specs, minutes * 60)
    console.print(f"static peak {static_n}; with {static_n - 1} the minutes lost are {lost}")
    out: dict[str, Any] = {"static_replicas": static_n, "lost_with_one_fewer": lost, "steps": []}
    for m in lost:
        lo = max(1, int(m * 60 // INTERVAL) - 6)
        i = max(range(lo, lo + 12), key=lambda j: meter[j] - meter[j - 1])   # the reading the step lands in
        console.print(f"minute {m}: demand steps {meter[i - 1]:.0f} → {meter[i]:.0f} tok/s at {i * INTERVAL:.0f} s")
        rows = []
        for w in (60, 120, 300, 600, 1200):
            k = int(w // INTERVAL)
            roll = [max(meter[max(0, j - k):j], default=meter[0]) for j in range(1, len(meter))]
            seen = max(meter[i - k:i])
            share = sum(roll) / len(roll) / seen
            rows.append({"window_s": w, "peak_before_step": seen, "x_static": share})
            console.print(f"  hold k × the highest reading of the last {w:4d} s: that peak was {seen:.0f} tok/s; "
                          f"≥ {share:.2f}× the static peak's GPU time")
        out["steps"].append({"minute": m, "time_s": i * INTERVAL, "from": meter[i - 1], "to": meter[i], "rows": rows})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=58.0)
    ap.add_argument("--holds", type=int, nargs="+", default=[4, 5, 6],
                    help="replicas held outside bursts, tried in order")
    ap.add_argument("--quantiles", type=float, nargs="+", default=[1.0, 0.95],
                    help="θ as a quantile of the base's 10-s readings (1.0: its maximum, no false alarm)")
    ap.add_argument("--bursts", nargs="+", default=["7", "8", "10"],
                    help="replicas ordered when a burst is called, each tried; '8,7,8': one per burst")
    ap.add_argument("--plateau", type=int, default=None,
                    help="replicas held once a called burst's new replicas have served 60 s (default: the order)")
    ap.add_argument("--static-gpu-h", type=float, default=None, help="skip the static-peak search")
    ap.add_argument("--out", type=Path, default=Path("bench/out/autoscale-bound.json"))
    ap.add_argument("--workload", choices=list(A.WORKLOADS), default="bursty")
    ap.add_argument("--static-replicas", type=int, default=None, help="diurnal: skip the static-peak search")
    ap.add_argument("--oracle", choices=["onset", "meter", "family"], default=None,
                    help="onset: the bursty oracle; family: the diurnal window family; meter: any workload "
                         "(default: onset on bursty, family on diurnal, meter otherwise)")
    ap.add_argument("--seed", type=int, default=0, help="the workload's seed (meter oracle)")
    ap.add_argument("--meter-holds", type=float, nargs="+", default=[120.0], help="meter oracle: holds tried, s")
    ap.add_argument("--meter-steps", type=int, default=5, help="meter oracle: bisection steps on utilisation")
    args = ap.parse_args()
    console = Console()
    oracle = args.oracle or {"bursty": "onset", "diurnal": "family"}.get(args.workload, "meter")
    if oracle == "meter":
        specs = A.WORKLOADS[args.workload](args.minutes, args.seed)
        console.rule(f"meter oracle on {args.workload} (seed {args.seed}, {args.minutes:g} min, {len(specs)} requests)")
        result = meter_oracle(console, specs, args.minutes, args.meter_holds, args.meter_steps)
        result.update(workload=args.workload, seed=args.seed, minutes=args.minutes)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        console.print(f"best: {result['best']}\nraw results: {args.out}")
        return
    if oracle == "family":
        result = diurnal_family(console, args.minutes, args.static_replicas)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        console.print(f"raw results: {args.out}")
        return
    span = args.minutes * 60
    base = superpose([s for s in azure_conv() if s.arrival < span], 6, seed=1)   # as bursty() builds it
    specs = bursty(args.minutes)
    base_meter, meter = readings(base, span), readings(specs, span)
    windows = sorted(base_meter[: int(span // INTERVAL)])
    bursts = [(span * f, span * f + 360.0) for f in BURSTS]
    if args.static_gpu_h is None:
        n, rep = static_peak(specs, console, hi=MAX_REPLICAS // 2)
        static_gpu_h = rep.summary["gpu_hours"]
    else:
        n, static_gpu_h = 0, args.static_gpu_h
    span_h = max(s.arrival for s in specs) / 3600
    console.print(f"static peak: {n} replicas, {static_gpu_h:.2f} GPU-h; base readings: mean "
                  f"{sum(windows) / len(windows):.0f}, max {windows[-1]:.0f} tok/s")
    rows: list[dict[str, Any]] = []
    for q in args.quantiles:
        theta = windows[min(len(windows) - 1, int(q * len(windows)))]
        called = [next((t + INTERVAL for t in range(int(a), int(b), int(INTERVAL))
                        if meter[int(t // INTERVAL)] > theta), None) for a, b in bursts]
        alarms = sum(1 for x in base_meter[: int(span // INTERVAL)] if x > theta)
        console.rule(f"θ = {theta:.0f} tok/s (q={q:g}): bursts called at "
                     f"{[f'onset+{c - a:.0f}s' if c else 'never' for c, (a, _) in zip(called, bursts, strict=True)]}, "
                     f"{alarms} base readings above θ")
        for sizes in args.bursts:
            size = tuple(int(x) for x in sizes.split(","))
            for hold in args.holds:
                report = run(specs, OnsetOracle(hold, size, theta, meter, bursts, args.plateau), hold)
                s = report.summary
                bad = [m for m, a in report.minutes() if a < 0.9]
                row = {"quantile": q, "theta": theta, "burst": sizes, "plateau": args.plateau, "hold": hold,
                       "bad_minutes": bad,
                       "minutes_within_slo": s["minutes_within_slo"], "gpu_hours": s["gpu_hours"],
                       "x_static": s["gpu_hours"] / static_gpu_h, "hold_floor_x_static": hold * span_h / static_gpu_h}
                rows.append(row)
                console.print(f"  burst {sizes}, hold {hold}: {s['minutes_within_slo']:.1%} of minutes (missed {bad}),"
                              f" {s['gpu_hours']:.2f} GPU-h = {row['x_static']:.2f}× static; holding {hold} alone:"
                              f" {row['hold_floor_x_static']:.2f}×")
                if s["minutes_within_slo"] >= GOAL_MINUTES:
                    break
    good = [r for r in rows if r["minutes_within_slo"] >= GOAL_MINUTES]
    if good:
        best = min(good, key=lambda r: r["gpu_hours"])
        console.print(f"cheapest oracle keeping every minute: {best['gpu_hours']:.2f} GPU-h = {best['x_static']:.2f}×"
                      f" static (θ q={best['quantile']:g}, hold {best['hold']}, burst {best['burst']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"static_replicas": n, "static_gpu_hours": static_gpu_h, "rows": rows}, indent=1))
    console.print(f"raw results: {args.out}")


if __name__ == "__main__":
    main()
