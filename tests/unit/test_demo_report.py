"""The demo's report fits an 80-column terminal, and its ideal hit rate is the replay's reuse."""

from __future__ import annotations

import io

from rich.console import Console

from kvpilot.demo import RunResult, ideal_hit_rate, report_table
from kvpilot.sim.families import make_workload


def test_report_fits_80_columns_without_cutting_headers_or_numbers() -> None:
    results = []
    for policy in ("dualmap", "round-robin", "least-loaded"):
        r = RunResult(policy, ttft=[0.12, 3.5, 123.45], tpot=[0.011, 0.35], errors=12, hit_rate=0.123, wall_s=1234)
        r.replicas = [(0.0, 4), (50.0, 8)]
        results.append(r)
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(report_table(results, 5.0, "300 Mooncake requests, "
                                                                       "4 × h100-llama3-8b"))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for word in ("policy", "TTFT s", "p50/p90/p99", "TPOT ms", "SLO", "hit", "GPUs", "round-robin",
                 "least-loaded", "123.5", "12.3%", "4-8"):
        assert word in text, word


def test_ideal_hit_rate_is_high_for_agentic_and_nil_without_reuse() -> None:
    assert ideal_hit_rate(make_workload("agentic", 500, 10.0, seed=0), 4 * 445_000) > 0.6
    assert ideal_hit_rate(make_workload("no-reuse", 500, 10.0, seed=0), 4 * 445_000) == 0.0


def test_demo_workload_is_the_mooncake_head_or_a_generated_one() -> None:
    from kvpilot.demo import demo_workload

    specs, label = demo_workload("mooncake", 50)
    assert label == "Mooncake" and len(specs) == 50 and specs[0].request_id == "mc-0"
    specs, label = demo_workload("agentic", 50)
    assert label == "agentic" and len(specs) == 50 and all(s.tenant for s in specs)
