"""Autoscaler benchmark in virtual time: kvpilot's planner vs grid-searched HPA-, KEDA- and
KPA-like baselines vs static peak provisioning, on five workloads (bench/autoscale_workloads.py).

World: one aggregated pool of h100-llama3-8b engines (sim.elastic) behind least-loaded routing
(the Azure trace has no prompt content, so there is no prefix affinity to exploit); replica
cold start 60 s; the autoscaler decides every 10 s. SLO: TTFT 2 s, TPOT 100 ms; a minute is
within SLO when ≥ 90% of the requests that arrived in it met both.

Baselines, each tuned the way a user would: every target of its grid is run on the workload
and the best setting is reported (the fewest GPU-hours among those keeping ≥ 99% of minutes,
else the most minutes): HPA on `vllm:num_requests_waiting` per replica, KEDA's Prometheus scaler
on TTFT p90 (a `Value` target), Knative KPA on in-flight requests per replica.

Static peak = the fewest fixed replicas that keep ≥ 99% of minutes within SLO (searched).

    .venv/bin/python -P bench/autoscale.py --workload bursty [--seed 0] [--minutes 58] [--grid]
    .venv/bin/python -P bench/autoscale.py --workload burstgpt --minutes 30 --baseline hpa-queue=5 --trace hpa-queue=5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvpilot import plots
from kvpilot.autoscaler.baselines import Concurrency, Fixed, LatencyThreshold, QueueThreshold
from kvpilot.autoscaler.planner import Plan, Planner, PlannerConfig, PoolPlanner, PoolSignals
from kvpilot.sim.elastic import ElasticCluster, ElasticConfig, ElasticReport
from kvpilot.sim.workload import RequestSpec

# bench/ is not a package (`python -P` keeps it off sys.path): load the workloads by file.
_spec = importlib.util.spec_from_file_location("autoscale_workloads",
                                               Path(__file__).with_name("autoscale_workloads.py"))
assert _spec is not None and _spec.loader is not None
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)
WORKLOADS: dict[str, Callable[[float, int], list[RequestSpec]]] = W.WORKLOADS

TTFT_SLO, TPOT_SLO, COLD_START, INTERVAL, MAX_REPLICAS = 2.0, 0.1, 60.0, 10.0, 32
PROFILE = "h100-llama3-8b"
# Minutes 0-1 are not scored: every autoscaler starts at 2 replicas, and nothing decided at the
# first interval serves before 70 s (a workload that opens above 2 replicas' worth loses them all).
WARMUP = 120.0
GOAL_MINUTES = 0.99
# Each baseline family's grid (its target's unit in the name).
GRIDS: dict[str, tuple[float, ...]] = {
    "hpa-queue": (0.5, 2.0, 10.0),                 # requests waiting per replica
    "keda-ttft": (0.25, 0.5, 1.0),                 # TTFT p90, s
    "kpa": (16.0, 32.0, 64.0),                     # requests in flight per replica
}


def bursty(minutes: float, seed: int = 0) -> list[RequestSpec]:
    return WORKLOADS["bursty"](minutes, seed)


def daily(minutes: float, seed: int = 0) -> list[RequestSpec]:
    return WORKLOADS["diurnal"](minutes, seed)


def baseline(family: str, target: float) -> Planner:
    bounds: dict[str, Any] = {"min_replicas": 1, "max_replicas": MAX_REPLICAS}
    if family == "hpa-queue":
        return QueueThreshold(target_waiting=target, **bounds)
    if family == "keda-ttft":
        return LatencyThreshold(target_ttft_s=target, **bounds)
    if family == "kpa":
        return Concurrency(target_per_replica=target, **bounds)
    raise ValueError(f"unknown baseline {family!r} (one of {sorted(GRIDS)})")


def best_of(rows: dict[str, dict[str, Any]]) -> str:
    """The setting a user tuning on this workload would keep: the fewest GPU-hours among those
    keeping ≥ 99% of minutes, else the most minutes (then the fewest GPU-hours)."""
    good = [k for k, r in rows.items() if r["minutes_within_slo"] >= GOAL_MINUTES]
    if good:
        return min(good, key=lambda k: rows[k]["gpu_hours"])
    return max(rows, key=lambda k: (rows[k]["minutes_within_slo"], -rows[k]["gpu_hours"]))


class Recorder:
    """Wraps a planner and keeps what it saw and said each interval: a baseline's own trace."""

    def __init__(self, inner: Planner) -> None:
        self.inner = inner
        self.rows: list[dict[str, Any]] = []

    def plan(self, s: PoolSignals) -> Plan:
        p = self.inner.plan(s)
        self.rows.append({"t": s.time, "asked": s.current, "ready": s.ready, "desired": p.desired,
                          "waiting": s.waiting, "running": s.running_seqs, "ttft_p90_s": s.ttft_p90_s,
                          "prompt_tps": s.uncached_prompt_tps, "reason": p.reason})
        return p


def planners(windows: tuple[float, ...] = (300.0, 240.0, 120.0), overrides: dict[str, Any] | None = None,
             baselines: dict[str, tuple[float, ...]] | None = None) -> dict[str, Callable[[], Planner]]:
    """kvpilot at each scale-down window, then each baseline family at each of its targets."""
    bounds: dict[str, Any] = {"min_replicas": 1, "max_replicas": MAX_REPLICAS}
    out: dict[str, Callable[[], Planner]] = {}
    tag = ", ".join(f"{k}={v}" for k, v in (overrides or {}).items())
    for window in windows:  # 300 s: the LLMService default (scaleDownStabilizationSeconds)
        cfg = PlannerConfig(ttft_slo_s=TTFT_SLO, tpot_slo_s=TPOT_SLO, forecast_s=2 * COLD_START + INTERVAL,
                            scale_down_window_s=window, **bounds, **(overrides or {}))
        name = "kvpilot" if window == 300 else f"kvpilot(window={window:g}s)"
        out[name if not tag else f"{name} ({tag})"] = lambda c=cfg: PoolPlanner("aggregated", c)
    for family, targets in (baselines or {}).items():
        for target in targets:
            out[f"{family}={target:g}"] = lambda f=family, t=target: baseline(f, t)
    return out


def run(specs: list[RequestSpec], planner: Planner, initial: int) -> ElasticReport:
    config = ElasticConfig(profile=PROFILE, slo_ttft_s=TTFT_SLO, slo_tpot_s=TPOT_SLO, initial_replicas=initial,
                           interval_s=INTERVAL, cold_start_s=COLD_START, warmup_s=WARMUP)
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


_FACTORIES: dict[str, Callable[[], Planner]] = {}   # set before the worker processes fork


def _one(job: tuple[str, float, int, str, bool]) -> tuple[str, dict[str, Any], float]:
    """One run (a worker process's unit): the row the tables and the JSON keep."""
    wname, minutes, seed, pname, trace = job
    specs = WORKLOADS[wname](minutes, seed)
    planner = _FACTORIES[pname]()
    rec = Recorder(planner) if trace else None
    t0 = time.perf_counter()
    report = run(specs, rec or planner, 2)
    row = {**report.summary, "timeline": [(d.time, d.asked, d.ready, d.desired) for d in report.decisions],
           "bad_minutes": [(m, a) for m, a in report.minutes() if a < 0.9]}
    if rec is not None:
        row["trace"] = rec.rows
        row["minute_attainment"] = report.minutes()
    return pname, row, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=58.0, help="span of each workload")
    ap.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both", help="both: bursty and diurnal")
    ap.add_argument("--seed", type=int, default=0, help="0: the development instance; report on others")
    ap.add_argument("--out", type=Path, default=Path("bench/out/autoscale.json"))
    ap.add_argument("--replot", type=Path, nargs="+", help="only draw the PNG from earlier --out files")
    ap.add_argument("--windows", type=float, nargs="*", default=[300.0, 240.0, 120.0],
                    help="kvpilot's scale-down windows to run, s (none: no kvpilot rows)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a PlannerConfig field for the kvpilot rows (repeatable), e.g. forecast_robust=true")
    ap.add_argument("--grid", nargs="*", choices=sorted(GRIDS), default=None,
                    help="run these baseline families over their whole grid (no value: all of them)")
    ap.add_argument("--baseline", action="append", default=[], metavar="FAMILY=TARGET",
                    help="run one baseline setting (repeatable), e.g. hpa-queue=2")
    ap.add_argument("--trace", action="append", default=[], metavar="ROW",
                    help="keep this row's per-interval signals (queue, TTFT, replicas) in the JSON and plot them")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (processes)")
    ap.add_argument("--static-replicas", type=int, help="the static peak's size (skips its search; 0: no static row)")
    args = ap.parse_args()
    overrides = dict(_override(kv) for kv in args.set)
    grids = {f: GRIDS[f] for f in (GRIDS if args.grid == [] else args.grid or [])}
    for kv in args.baseline:
        family, _, target = kv.partition("=")
        grids.setdefault(family, ())
        grids[family] = (*grids[family], float(target))
    chosen = planners(tuple(args.windows), overrides, grids)
    if args.replot:
        results = {k: v for f in args.replot for k, v in json.loads(f.read_text()).items()}
        print(f"plot: {plot(results, args.replot[0].with_suffix('.png'))}")
        return
    console = Console()
    results: dict[str, Any] = {}
    names = ["bursty", "diurnal"] if args.workload == "both" else [args.workload]
    for wname in names:
        specs = WORKLOADS[wname](args.minutes, args.seed)
        console.rule(f"{wname} (seed {args.seed}): {len(specs)} requests over {args.minutes:g} min")
        _FACTORIES.update(chosen)
        jobs = [(wname, args.minutes, args.seed, pname, pname in args.trace) for pname in chosen]
        rows: dict[str, Any] = {}
        walls: dict[str, float] = {}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{wname}: autoscalers", total=len(jobs))
            if args.jobs > 1:
                from multiprocessing import get_context
                with get_context("fork").Pool(args.jobs) as pool:
                    for pname, row, wall in pool.imap_unordered(_one, jobs):
                        rows[pname], walls[pname] = row, wall
                        progress.advance(task)
            else:
                for job in jobs:
                    pname, row, wall = _one(job)
                    rows[pname], walls[pname] = row, wall
                    progress.advance(task)
        rows = {k: {**rows[k], "wall_s": walls[k]} for k in chosen}
        for pname, row in rows.items():
            console.print(f"  {pname}: {row['minutes_within_slo']:.1%} minutes, {row['gpu_hours']:.2f} GPU-h "
                          f"({row['wall_s']:.1f}s)")
        # The static reference: searched up to twice the most replicas any autoscaler used.
        if args.static_replicas == 0:          # no static reference (a row run on its own)
            n, peak_gpu_h = 0, float("nan")
        elif args.static_replicas:
            n, report = args.static_replicas, run(specs, Fixed(args.static_replicas), args.static_replicas)
        else:
            most = max((r["max_replicas"] for r in rows.values()), default=MAX_REPLICAS // 2)
            n, report = static_peak(specs, console, hi=min(MAX_REPLICAS, 2 * most))
        if n:
            rows = {f"static peak ({n})": {**report.summary, "timeline": []}, **rows}
            peak_gpu_h = report.summary["gpu_hours"]
        best = {f: best_of({k: r for k, r in rows.items() if k.startswith(f + "=")}) for f in grids}
        table = Table(title=f"{wname} (seed {args.seed}) — TTFT {TTFT_SLO:g}s / TPOT {TPOT_SLO * 1e3:g}ms, "
                            f"cold start {COLD_START:g}s; * = the family's best setting")
        for col in ("autoscaler", "minutes within SLO", "requests within SLO", "GPU-hours", "× static peak",
                    "mean / max replicas", "scale events", "TTFT p99 s", "TPOT p99 ms"):
            table.add_column(col, justify="left" if col == "autoscaler" else "right")
        for pname, r in rows.items():
            mark = " *" if pname in best.values() else ""
            table.add_row(pname + mark, f"{r['minutes_within_slo']:.1%}", f"{r['slo_attainment']:.1%}",
                          f"{r['gpu_hours']:.2f}", f"{r['gpu_hours'] / peak_gpu_h:.2f}",
                          f"{r['mean_replicas']:.1f} / {r['max_replicas']}", str(r["scale_events"]),
                          f"{r['ttft_p99_s']:.2f}", f"{r['tpot_p99_s'] * 1e3:.0f}")
        console.print(table)
        results[wname] = {"requests": len(specs), "seed": args.seed, "minutes": args.minutes, "warmup_s": WARMUP,
                          "static_peak_gpu_hours": peak_gpu_h, "best": best, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    console.print(f"raw results: {args.out}\nplot: {plot(results, args.out.with_suffix('.png'))}")
    for wname, res in results.items():
        for pname, row in res["rows"].items():
            if "trace" in row:
                path = args.out.with_name(f"{args.out.stem}-{wname}-{pname}-trace.png")
                console.print(f"trace: {plot_trace(wname, pname, row, path)}")


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


def plot_trace(wname: str, pname: str, row: dict[str, Any], path: Path) -> Path:
    """One row's own trace: replicas asked for and ready, requests waiting, TTFT p90, and the
    minutes that missed the SLO, over time (how a baseline fails, read off its own signals)."""
    tr = row["trace"]
    ts = [r["t"] / 60 for r in tr]
    fig, axes = plots.subplots(3, 1, figsize=(10, 8), sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.step(ts, [r["asked"] for r in tr], where="post", label="asked for")
    ax.step(ts, [r["ready"] for r in tr], where="post", label="ready")
    bad = [m for m, a in row.get("minute_attainment", []) if a < 0.9]
    ax.plot([m + 0.5 for m in bad], [0.3] * len(bad), "|", color="red", markersize=12, label="missed minute")
    ax.set_ylabel("replicas")
    ax.legend(fontsize=7)
    ax.set_title(f"{wname}: {pname} — {row['minutes_within_slo']:.0%} of minutes, {row['gpu_hours']:.1f} GPU-h")
    axes[1, 0].plot(ts, [r["waiting"] or 0 for r in tr])
    axes[1, 0].set_ylabel("requests waiting")
    axes[2, 0].semilogy(ts, [max(1e-2, r["ttft_p90_s"] or 1e-2) for r in tr])
    axes[2, 0].axhline(TTFT_SLO, color="black", linestyle=":")
    axes[2, 0].set_ylabel("TTFT p90 s")
    axes[2, 0].set_xlabel("minute")
    return plots.save(fig, path)


if __name__ == "__main__":
    main()
