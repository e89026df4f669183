"""One table over the autoscaler benchmark's runs: per workload and seed, the static peak,
kvpilot, each baseline family's best-tuned setting and the causal meter oracle, with GPU-hours
as a ratio to the oracle's (the issue's goal: ≥ 99% of minutes at ≤ 1.15× the oracle, and
fewer GPU-hours than the best-tuned baseline at equal or better minutes).

    .venv/bin/python -P bench/autoscale_report.py bench/out/as-*.json --oracles bench/out/oracle-*.json

Minutes are scored from WARMUP on (bench/autoscale.py); runs written before the warm-up was
scored (no "warmup_s" in their JSON) are rescored from their recorded missed minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location("autoscale", Path(__file__).with_name("autoscale.py"))
assert _spec is not None and _spec.loader is not None
A = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(A)


def rescored(row: dict[str, Any], warmup_counted: bool) -> float:
    """Share of scored minutes within SLO."""
    first = int(A.WARMUP // 60)
    total = row["minutes"] - (first if warmup_counted else 0)
    bad = sum(1 for m, _ in row.get("bad_minutes", []) if m >= first)
    if "bad_minutes" not in row:          # the static row keeps no list: its own figure stands
        return float(row["minutes_within_slo"])
    return (total - bad) / total if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--oracles", type=Path, nargs="*", default=[])
    args = ap.parse_args()
    oracles: dict[tuple[str, int], dict[str, Any]] = {}
    for f in args.oracles:
        o = json.loads(f.read_text())
        if o.get("best"):
            oracles[(o["workload"], o.get("seed", 0))] = o["best"]
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for f in args.runs:   # rows of one workload and seed may come from many files (one row each)
        for wname, res in json.loads(f.read_text()).items():
            counted = "warmup_s" not in res
            rows = merged.setdefault((wname, res.get("seed", 0)), {})
            rows.update({k: {**r, "minutes_within_slo": rescored(r, counted)} for k, r in res["rows"].items()})
    print("| workload (seed) | row | minutes in SLO | GPU-h | × oracle | × static peak |")
    print("|---|---|---:|---:|---:|---:|")
    for (wname, seed), rows in merged.items():
        best = {fam: A.best_of({k: r for k, r in rows.items() if k.startswith(fam + "=")})
                for fam in A.GRIDS if any(k.startswith(fam + "=") for k in rows)}
        statics = sorted((int(k.split("(")[1].rstrip(")")), k) for k in rows if k.startswith("static"))
        peak = next((k for _, k in statics if rows[k]["minutes_within_slo"] >= A.GOAL_MINUTES), None)
        static = rows[peak]["gpu_hours"] if peak else float("nan")
        oracle = oracles.get((wname, seed))
        show = [k for _, k in statics] + [k for k in rows if k.startswith("kvpilot")] + list(best.values())
        if oracle:
            rows["meter oracle"] = {"minutes_within_slo": oracle["minutes_within_slo"],
                                    "gpu_hours": oracle["gpu_hours"]}
            show.append("meter oracle")
        for k in show:
            r = rows[k]
            x_oracle = f"{r['gpu_hours'] / oracle['gpu_hours']:.2f}" if oracle else "—"
            tag = " (family's best)" if k in best.values() else " ← the static peak" if k == peak else ""
            print(f"| {wname} ({seed}) | {k}{tag} | {r['minutes_within_slo']:.1%} | {r['gpu_hours']:.2f} | "
                  f"{x_oracle} | {r['gpu_hours'] / static:.2f} |")
        grid = [k for k in rows if any(k.startswith(f + "=") for f in A.GRIDS)]
        print("\ngrid: " + "; ".join(f"{k} {rows[k]['minutes_within_slo']:.1%} / {rows[k]['gpu_hours']:.2f}"
                                     for k in grid) + "\n")


if __name__ == "__main__":
    main()
