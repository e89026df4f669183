"""Share of DualMap's live decisions that are SLO fallbacks, in local mode (real router and workers).

    .venv/bin/python -P bench/live_fallback.py [--requests 200] [--time-scale 10] [--rate 0.5]

Starts the default LLMService locally (4 `kvpilot sim serve` workers, autoscaler off), replays the
first `--requests` Mooncake requests at `--rate` × the trace's rate through the router, then reads
the router's decision counters. At light load nearly every decision should be `affinity`; a high
fallback share means the TTFT predictor overestimates (e.g. fixed per-request overheads charged to
the per-token prefill time). Bounded: ~`requests / 3 / rate / time_scale` × 10 wall seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from rich.progress import Progress

from kvpilot.demo import RunResult, replay
from kvpilot.local import LocalControlPlane, load_service
from kvpilot.sim.cluster import percentile
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.workload import mooncake


def router_state(router_url: str) -> tuple[dict[str, float], list[float]]:
    """Decisions by reason, and the predictor's calibrated per-token prefill time per endpoint."""
    with urllib.request.urlopen(router_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    token_s: list[float] = []
    for family in text_string_to_metric_families(text):
        if family.name == "kvpilot_router_decisions":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[s.labels["reason"]] = out.get(s.labels["reason"], 0.0) + s.value
        elif family.name == "kvpilot_router_prefill_token_seconds":
            token_s += [s.value for s in family.samples]
    return out, token_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--time-scale", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.5, help="load as a multiple of the trace's rate")
    args = parser.parse_args()
    service = load_service(None)
    slo_s = service.spec.slo.ttft_ms / 1000
    specs = mooncake(limit=args.requests)
    result = RunResult("dualmap")
    with LocalControlPlane(service, time_scale=args.time_scale, policy="dualmap", autoscale=False) as plane:
        t0 = time.monotonic()
        with Progress(disable=True) as progress:
            asyncio.run(replay(plane.url, plane.model, specs, args.time_scale, args.rate, result, progress, slo_s))
        wall = time.monotonic() - t0
        counts, token_s = router_state(plane.url)

    total = sum(counts.values()) or 1.0
    prior = get_profile(service.spec.engine.profile or "h100-llama3-8b").prefill_token_s / args.time_scale
    ok = sum(1 for t in result.ttft if t <= slo_s) / max(1, len(result.ttft) + result.errors)
    print(f"requests {len(specs)}, rate ×{args.rate}, time scale {args.time_scale}, wall {wall:.0f} s, "
          f"errors {result.errors}")
    print("decisions: " + ", ".join(f"{k} {v:.0f} ({v / total:.0%})" for k, v in sorted(counts.items())))
    print("calibrated prefill µs/token (wall): " + ", ".join(f"{t * 1e6:.1f}" for t in sorted(token_s))
          + f" (prior, the modelled GPU's: {prior * 1e6:.1f})")
    print(f"TTFT p50 {percentile(result.ttft, 50):.2f} s, p90 {percentile(result.ttft, 90):.2f} s (modelled), "
          f"within SLO {ok:.1%}")


if __name__ == "__main__":
    main()
