"""A readable table of a virtual-time cluster run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kvpilot.sim.cluster import ClusterReport


def print_report(report: ClusterReport, wall_s: float | None = None, console: Console | None = None) -> None:
    console = console or Console()
    s, cfg = report.summary, report.config
    title = (f"{cfg.instances} × {cfg.profile}, policy {cfg.policy}, {s['requests']} requests, "
             f"TTFT SLO {cfg.slo_ttft_s:g}s")
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("SLO attainment", f"{s['slo_attainment']:.1%}"),
        ("TTFT p50 / p90 / p99 (s)", f"{s['ttft_p50_s']:.3f} / {s['ttft_p90_s']:.3f} / {s['ttft_p99_s']:.3f}"),
        ("TPOT p50 / p90 / p99 (ms)",
         f"{s['tpot_p50_s'] * 1e3:.1f} / {s['tpot_p90_s'] * 1e3:.1f} / {s['tpot_p99_s'] * 1e3:.1f}"),
        ("prefix-cache hit rate (tokens)", f"{s['cache_hit_rate']:.1%}"),
        ("load imbalance (max/mean computed prefill)", f"{s['load_imbalance']:.2f}"),
        ("throughput (req/s, output tok/s)", f"{s['throughput_rps']:.2f}, {s['output_tokens_per_s']:.0f}"),
        ("preemptions", str(s["preemptions"])),
        ("simulated span (s)", f"{report.makespan_s:.1f}"),
    ]
    if wall_s is not None:
        rows.append(("wall time (s), engine events", f"{wall_s:.2f}, {report.events}"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
