"""Autoscaler benchmark in virtual time: kvpilot's planner vs HPA-like and KPA-like baselines
vs static peak provisioning, on a bursty and a diurnal workload.

World: one aggregated pool of h100-llama3-8b engines (sim.elastic) behind least-loaded routing
(the Azure trace has no prompt content, so there is no prefix affinity to exploit); replica
cold start 60 s; the autoscaler decides every 10 s. SLO: TTFT 2 s, TPOT 100 ms; a minute is
within SLO when ≥ 90% of the requests that arrived in it met both.

Workloads:
- bursty: the Azure LLM 2023 conversation trace (58 min), six seeded superposed replays
  (≈ 33 req/s), with three injected bursts (3×, 2.5×, 3× for 6 min each, 2 min ramps);
- diurnal: ServeGen m-large's aggregate rate shape over one day (day 9: peak 2.7×, trough
  0.43× the mean) compressed into 60 min, Poisson arrivals at a mean of 50 req/s, request
  sizes drawn from the Azure trace.

Static peak = the fewest fixed replicas that keep ≥ 99% of minutes within SLO (searched).

    .venv/bin/python -P bench/autoscale.py [--minutes 58] [--out bench/out/autoscale.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvpilot import plots
from kvpilot.autoscaler.baselines import Concurrency, Fixed, QueueThreshold
from kvpilot.autoscaler.planner import Planner, PlannerConfig, PoolPlanner
from kvpilot.sim.elastic import ElasticCluster, ElasticConfig, ElasticReport
from kvpilot.sim.workload import RequestSpec, azure_conv, diurnal, servegen_shape, superpose, with_bursts

TTFT_SLO, TPOT_SLO, COLD_START, INTERVAL, MAX_REPLICAS = 2.0, 0.1, 60.0, 10.0, 32
GOAL_MINUTES = 0.99


def bursty(minutes: float) -> list[RequestSpec]:
    base = [s for s in azure_conv() if s.arrival < minutes * 60]
    span = minutes * 60
    bursts = [(span * f, 360.0, k, 120.0) for f, k in ((0.15, 3.0), (0.45, 2.5), (0.75, 3.0))]
    return with_bursts(superpose(base, 6, seed=1), bursts, seed=2)


def daily(minutes: float) -> list[RequestSpec]:
    shape = servegen_shape(first_day=9)
    sizes = azure_conv(limit=5000)
    return diurnal(shape, window_s=minutes * 60 / len(shape), mean_rate=50.0, sizes=sizes, seed=3)


def planners(windows: tuple[float, ...] = (300.0, 240.0, 120.0), overrides: dict[str, Any] | None = None,
             baselines: bool = True) -> dict[str, Callable[[], Planner]]:
    bounds: dict[str, Any] = {"min_replicas": 1, "max_replicas": MAX_REPLICAS}
    out: dict[str, Callable[[], Planner]] = {}
    tag = ", ".join(f"{k}={v}" for k, v in (overrides or {}).items())
    for window in windows:  # 300 s: the LLMService default (scaleDownStabilizationSeconds)
        cfg = PlannerConfig(ttft_slo_s=TTFT_SLO, tpot_slo_s=TPOT_SLO, forecast_s=2 * COLD_START + INTERVAL,
                            scale_down_window_s=window, **bounds, **(overrides or {}))
        name = "kvpilot" if window == 300 else f"kvpilot(window={window:g}s)"
        out[name if not tag else f"{name} ({tag})"] = lambda c=cfg: PoolPlanner("aggregated", c)
    if not baselines:
        return out
    for target in (2.0, 5.0):
        out[f"hpa-queue(waiting={target:g})"] = lambda t=target: QueueThreshold(target_waiting=t, **bounds)
    for target in (64.0, 128.0):
        out[f"kpa(concurrency={target:g})"] = lambda t=target: Concurrency(target_per_replica=t, **bounds)
    return out


def run(specs: list[RequestSpec], planner: Planner, initial: int) -> ElasticReport:
    config = ElasticConfig(slo_ttft_s=TTFT_SLO, slo_tpot_s=TPOT_SLO, initial_replicas=initial,
                           interval_s=INTERVAL, cold_start_s=COLD_START)
    return ElasticCluster(config, planner).run(specs)


def static_peak(specs: list[RequestSpec], console: Console, hi: int = MAX_REPLICAS) -> tuple[int, ElasticReport]:
    """Binary search for the fewest fixed replicas meeting the minutes goal, at most `hi`."""
    lo, best = 1, None
    while lo < hi:
        mid = (lo + hi) // 2
        report = run(specs, Fixed(mid), mid)
        console.print(f"  static {mid}: {report.summary['minutes_within_slo']:.1%} of minutes within SLO")
        if report.summary["minutes_within_slo"] >= GOAL_MINUTES:
            hi, best = mid, report
        else:
            lo = mid + 1
    if best is None or lo != hi:
        best = run(specs, Fixed(lo), lo)
    return lo, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=58.0, help="span of each workload")
    ap.add_argument("--workload", choices=["bursty", "diurnal", "both"], default="both")
    ap.add_argument("--out", type=Path, default=Path("bench/out/autoscale.json"))
    ap.add_argument("--replot", type=Path, nargs="+", help="only draw the PNG from earlier --out files")
    ap.add_argument("--windows", type=float, nargs="+", default=[300.0, 240.0, 120.0],
                    help="kvpilot's scale-down windows to run, s")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a PlannerConfig field for the kvpilot rows (repeatable), e.g. forecast_robust=true")
    ap.add_argument("--kvpilot-only", action="store_true", help="skip the baselines")
    ap.add_argument("--static-replicas", type=int, help="the static peak's size (skips its search)")
    args = ap.parse_args()
    overrides = dict(_override(kv) for kv in args.set)
    chosen = planners(tuple(args.windows), overrides, baselines=not args.kvpilot_only)
    if args.replot:
        results = {k: v for f in args.replot for k, v in json.loads(f.read_text()).items()}
        print(f"plot: {plot(results, args.replot[0].with_suffix('.png'))}")
        return
    console = Console()
    results: dict[str, Any] = {}
    names = ["bursty", "diurnal"] if args.workload == "both" else [args.workload]
    for wname in names:
        specs = bursty(args.minutes) if wname == "bursty" else daily(args.minutes)
        console.rule(f"{wname}: {len(specs)} requests over {args.minutes:g} min")
        rows: dict[str, Any] = {}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{wname}: autoscalers", total=len(chosen))
            reports = {}
            for pname, factory in chosen.items():
                t0 = time.perf_counter()
                reports[pname] = (run(specs, factory(), 2), time.perf_counter() - t0)
                progress.advance(task)
        for pname, (report, wall) in reports.items():
            rows[pname] = {**report.summary, "wall_s": wall,
                           "timeline": [(d.time, d.asked, d.ready, d.desired) for d in report.decisions],
                           "bad_minutes": [(m, a) for m, a in report.minutes() if a < 0.9]}
            console.print(f"  {pname}: {report.summary['minutes_within_slo']:.1%} minutes, "
                          f"{report.summary['gpu_hours']:.2f} GPU-h ({wall:.1f}s)")
        # The static reference: searched up to twice the most replicas any autoscaler used.
        if args.static_replicas:
            n, report = args.static_replicas, run(specs, Fixed(args.static_replicas), args.static_replicas)
        else:
            n, report = static_peak(specs, console,
                                    hi=min(MAX_REPLICAS, 2 * max(r["max_replicas"] for r in rows.values())))
        rows = {f"static peak ({n})": {**report.summary, "timeline": []}, **rows}
        peak_gpu_h = report.summary["gpu_hours"]
        table = Table(title=f"{wname} — TTFT {TTFT_SLO:g}s / TPOT {TPOT_SLO * 1e3:g}ms, cold start {COLD_START:g}s")
        for col in ("autoscaler", "minutes within SLO", "requests within SLO", "GPU-hours", "× static peak",
                    "mean / max replicas", "scale events", "TTFT p99 s", "TPOT p99 ms"):
            table.add_column(col, justify="left" if col == "autoscaler" else "right")
        for pname, s in rows.items():
            table.add_row(pname, f"{s['minutes_within_slo']:.1%}", f"{s['slo_attainment']:.1%}",
                          f"{s['gpu_hours']:.2f}", f"{s['gpu_hours'] / peak_gpu_h:.2f}",
                          f"{s['mean_replicas']:.1f} / {s['max_replicas']}", str(s["scale_events"]),
                          f"{s['ttft_p99_s']:.2f}", f"{s['tpot_p99_s'] * 1e3:.0f}")
        console.print(table)
        results[wname] = {"requests": len(specs), "static_peak_gpu_hours": peak_gpu_h, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    console.print(f"raw results: {args.out}\nplot: {plot(results, args.out.with_suffix('.png'))}")


def _override(kv: str) -> tuple[str, Any]:
    """FIELD=VALUE for PlannerConfig, the value parsed as the field's default is typed."""
    key, _, raw = kv.partition("=")
    default = getattr(PlannerConfig(), key)
    if isinstance(default, bool):
        return key, raw.lower() in ("1", "true", "yes")
    return key, type(default)(raw)


def plot(results: dict[str, Any], path: Path) -> Path:
    """Replicas over time per autoscaler (and the static peak), with the minutes that missed the SLO."""
    fig, axes = plots.subplots(len(results), 1, figsize=(10, 3.6 * len(results)), squeeze=False)
    for ax, (wname, res) in zip(axes[:, 0], results.items(), strict=True):
        for name, row in res["rows"].items():
            if name.startswith("static"):
                ax.axhline(row["max_replicas"], color="black", linestyle=":", label=name)
                continue
            tl = row["timeline"]
            if not tl:
                continue
            line, = ax.step([t / 60 for t, *_ in tl], [asked for _, asked, *_ in tl], where="post",
                            label=f"{name}: {row['minutes_within_slo']:.0%} min in SLO, {row['gpu_hours']:.1f} GPU-h")
            bad = [m for m, _ in row.get("bad_minutes", [])]
            ax.plot([m + 0.5 for m in bad], [0.3] * len(bad), "|", color=line.get_color(), markersize=12)
        ax.set_title(f"{wname} ({res['requests']} requests); ticks at the bottom: minutes that missed the SLO")
        ax.set_xlabel("minute")
        ax.set_ylabel("replicas asked for")
        ax.legend(fontsize=7, loc="upper right")
    return plots.save(fig, path)


if __name__ == "__main__":
    main()
