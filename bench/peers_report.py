"""The report of bench/peers.py from its runs: a markdown table per workload and rate step (mean
and the min–max spread over repeats), the verdict the issue asks for (is DualMap's SLO attainment
and engine-side hit rate ≥ every peer policy's at each step?), and a PNG plot.

    .venv/bin/python -P bench/peers_report.py bench/results/peers.json    # re-render from the JSON

Pure functions of the run rows, apart from writing the files, so the report can be redone from a
recorded JSON without rerunning anything.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

Row = dict[str, Any]
METRICS = ("attainment", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "hit_rate", "cpu_s_per_1k", "errors")
DUALMAP = "kvpilot:dualmap"
TIE = 5e-4   # below the reports' precision (0.1 %): a peer this close is level, not ahead


def summarise(runs: list[Row]) -> dict[tuple[str, float], dict[str, dict[str, tuple[float, float, float]]]]:
    """(workload, rate) → contender → metric → (mean, min, max) over repeats, contenders in run order."""
    groups: dict[tuple[str, float], dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[(r["workload"], r["rate"])][r["contender"]].append(r)
    out: dict[tuple[str, float], dict[str, dict[str, tuple[float, float, float]]]] = {}
    for step, by_contender in groups.items():
        out[step] = {c: {m: (statistics.fmean(float(x[m]) for x in rows), min(float(x[m]) for x in rows),
                             max(float(x[m]) for x in rows)) for m in METRICS}
                     for c, rows in sorted(by_contender.items(), key=lambda kv: _order(kv[0]))}
    return out


def _order(label: str) -> tuple[int, str]:
    router = label.split(":", 1)[0]
    return ({"kvpilot": 0, "sglang": 1, "vllm": 2}.get(router, 3), "" if label == DUALMAP else label)


def verdict(step: dict[str, dict[str, tuple[float, float, float]]]) -> tuple[bool, bool, list[str]]:
    """(DualMap's mean attainment ≥ every peer's, its mean hit rate ≥ every peer's, the peers ahead);
    means over repeats, level within TIE."""
    if DUALMAP not in step:
        return False, False, []
    dm = step[DUALMAP]
    peers = {c: s for c, s in step.items() if not c.startswith("kvpilot:")}
    behind = [f"{c} ({m} {s[m][0]:.1%} vs {dm[m][0]:.1%})" for c, s in peers.items()
              for m in ("attainment", "hit_rate") if s[m][0] > dm[m][0] + TIE]
    att = all(s["attainment"][0] <= dm["attainment"][0] + TIE for s in peers.values())
    hit = all(s["hit_rate"][0] <= dm["hit_rate"][0] + TIE for s in peers.values())
    return att, hit, behind


def _spread(v: tuple[float, float, float], pct: bool = True) -> str:
    mean, lo, hi = v
    if pct:
        return f"{mean:.1%}" if hi - lo < 5e-4 else f"{mean:.1%} ({lo:.1%}–{hi:.1%})"
    return f"{mean:.2f}" if hi - lo < 5e-3 else f"{mean:.2f} ({lo:.2f}–{hi:.2f})"


def markdown(meta: dict[str, Any], runs: list[Row]) -> str:
    a = meta["args"]
    lines = [
        "# kvpilot router vs sglang-router vs vllm-router, live (bench/peers.py)", "",
        f"Command: `{meta['command']}`  ", f"Started {meta['started_utc']} UTC, {meta['minutes']} min, "
        f"{meta['cores']} cores; load average before {meta['loadavg_before']}, after {meta['loadavg_after']} "
        "(a shared machine: **loaded numbers**, read the ordering, not the absolute values)."
        + ("" if meta.get("complete", True) else " **Cut short: only the steps below finished.**"), "",
        f"Fleet: {a['workers']} × `kvpilot sim serve --profile {a['profile']} --time-scale {a['time_scale']} "
        f"--kv-capacity-tokens {a['kv_capacity_tokens']}`, caches reset before each run. {a['requests']} requests "
        f"per run (outputs capped at {a['max_tokens']} tokens), TTFT SLO {a['slo_ttft']} s; rates and latencies "
        f"in modelled time; {a['repeats']} repeat(s), seeds {a['seed']}…{a['seed'] + a['repeats'] - 1}, the "
        "same for every contender. Cells: mean (min–max over repeats). Hit rate: the workers' own "
        "vllm:prefix_cache_hits/queries over the run. CPU: the router's process group, user+system s per "
        "1,000 requests.", ""]
    for (workload, rate), step in summarise(runs).items():
        att, hit, behind = verdict(step)
        lines += [f"## {workload} at {rate:g} req/s", "",
                  "| router:policy | in SLO | TTFT p50 s | TTFT p90 s | TTFT p99 s | hit rate | CPU s/1k | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c, s in step.items():
            name = f"**{c}**" if c == DUALMAP else c
            lines.append(f"| {name} | {_spread(s['attainment'])} | {_spread(s['ttft_p50_s'], False)} | "
                         f"{_spread(s['ttft_p90_s'], False)} | {_spread(s['ttft_p99_s'], False)} | "
                         f"{_spread(s['hit_rate'])} | {_spread(s['cpu_s_per_1k'], False)} | "
                         f"{s['errors'][0]:.0f} |")
        has_peers = any(not c.startswith("kvpilot:") for c in step)
        lines += ["", f"DualMap ≥ every peer policy: attainment **{'yes' if att else 'no'}**, hit rate "
                      f"**{'yes' if hit else 'no'}**" + (f"; ahead of it: {', '.join(behind)}" if behind else "")
                  if has_peers and DUALMAP in step else "(no peer router in this run)", ""]
    return "\n".join(lines)


def plot(runs: list[Row], path: Path) -> Path:
    """Attainment and hit rate against rate, one line per contender, error bars the min–max spread."""
    from kvpilot import plots

    summary = summarise(runs)
    workloads = list(dict.fromkeys(w for w, _ in summary))
    fig, axes = plots.subplots(2, len(workloads), figsize=(6 * len(workloads), 8), squeeze=False)
    for col, workload in enumerate(workloads):
        steps = sorted((r, s) for (w, r), s in summary.items() if w == workload)
        labels = list(dict.fromkeys(c for _, s in steps for c in s))
        for row, metric in enumerate(("attainment", "hit_rate")):
            ax = axes[row][col]
            for c in labels:
                pts = [(r, s[c][metric]) for r, s in steps if c in s]
                style = {"linewidth": 3, "color": "black"} if c == DUALMAP else {
                    "linestyle": {"kvpilot": "-", "sglang": "--", "vllm": ":"}[c.split(":")[0]]}
                ax.errorbar([r for r, _ in pts], [v[0] for _, v in pts],
                            yerr=[[v[0] - v[1] for _, v in pts], [v[2] - v[0] for _, v in pts]],
                            marker="o", capsize=3, label=c, **style)
            ax.set_title(f"{workload}: {'SLO attainment' if metric == 'attainment' else 'engine-side hit rate'}")
            ax.set_xlabel("offered rate (req/s, modelled)")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("kvpilot router vs sglang-router vs vllm-router (loaded 2-core machine)")
    return plots.save(fig, path, dpi=100)


def write_report(meta: dict[str, Any], runs: list[Row], out: Path) -> list[Path]:
    """OUT.md (with OUT.notes.md appended when it exists: notes written by hand about a recording
    survive re-rendering) and OUT.png."""
    md = out.with_suffix(".md")
    notes = out.with_suffix(".notes.md")
    md.write_text(markdown(meta, runs) + "\n" + ("\n" + notes.read_text() if notes.exists() else ""))
    return [md, plot(runs, out.with_suffix(".png"))]


if __name__ == "__main__":
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    for p in write_report(data["meta"], data["runs"], src.with_suffix("")):
        print(f"wrote {p}")
