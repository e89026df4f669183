"""A one-interval demand step against what a causal planner has read: the prompt capacity that
must already be serving when the step lands to keep its minute, and what holding it costs a
policy that sizes on the readings it has seen.

For a workload instance and a minute, the step is the largest rise between consecutive 10-s
readings of prompt tokens/s arrived in or just before that minute. Capacity ordered at the first
reading that shows it (the interval's end) serves a cold start later, so until then the minute's
requests are replayed FIFO through `C` tok/s held from the minute's start (engine-local queues:
what queued stays queued), and C is bisected as the least keeping ≥ 90% of the minute's requests
within the TTFT SLO. M is the highest reading of the `--seen` seconds before the step: the
planner's information (what it computed, which is what arrived while it kept up). A policy that
sizes as k × the highest reading of a window must then have k ≥ C / M at that moment, and if it
holds k × its window's highest reading everywhere its mean size over the run is k × the mean
rolling maximum: its prefill GPU time, printed at `--capacity` tok/s per replica.

    .venv/bin/python -P bench/autoscale_step.py --workload burstgpt --seed 1 --minute 12 [--seen 120]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from kvpilot.sim.workload import RequestSpec

_spec = importlib.util.spec_from_file_location("autoscale_workloads",
                                               Path(__file__).with_name("autoscale_workloads.py"))
assert _spec is not None and _spec.loader is not None
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)
INTERVAL, COLD_START = 10.0, 60.0


def in_slo(specs: list[RequestSpec], start: float, ready: float, cap: float, slo: float) -> float:
    """Share of the minute from `start` whose requests start prefill within `slo` at `cap` tok/s
    until `ready` (those arriving after it are taken as served by the new capacity)."""
    minute = [s for s in specs if start <= s.arrival < start + 60]
    backlog, t, late = 0.0, start, 0
    for s in (s for s in minute if s.arrival < ready):
        backlog = max(0.0, backlog - cap * (s.arrival - t)) + s.prompt_tokens
        t = s.arrival
        late += backlog / cap > slo
    return 1 - late / max(1, len(minute))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="burstgpt")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--minute", type=int, required=True)
    ap.add_argument("--seen", type=float, default=120.0, help="window whose highest reading the policy holds to, s")
    ap.add_argument("--capacity", type=float, default=25_500.0, help="prompt tok/s one replica computes")
    ap.add_argument("--slo", type=float, default=2.0)
    args = ap.parse_args()
    specs = sorted(W.WORKLOADS[args.workload](args.minutes, args.seed), key=lambda s: s.arrival)
    n = int(args.minutes * 60 // INTERVAL) + 1
    read = [0.0] * n
    for s in specs:
        read[min(n - 1, int(s.arrival // INTERVAL))] += s.prompt_tokens / INTERVAL
    lo = int(args.minute * 60 // INTERVAL)
    i = max(range(max(1, lo - 1), lo + 6), key=lambda j: read[j] - read[j - 1])
    start, ready = args.minute * 60.0, (i + 1) * INTERVAL + COLD_START
    k = int(args.seen // INTERVAL)
    seen = max(read[max(0, i - k):i])
    c_lo, c_hi = 1_000.0, 2_000_000.0
    for _ in range(40):
        mid = (c_lo + c_hi) / 2
        c_lo, c_hi = (c_lo, mid) if in_slo(specs, start, ready, mid, args.slo) >= 0.9 else (mid, c_hi)
    need = c_hi
    roll = [max(read[max(0, j - k):j]) for j in range(1, n)]
    mean_roll = sum(roll) / len(roll)
    x = need / seen
    hours = args.minutes / 60
    print(f"{args.workload} seed {args.seed}: readings (tok/s) {i * 10 - 30:.0f}-{i * 10 + 30:.0f} s: "
          f"{[round(r) for r in read[i - 3:i + 4]]}")
    print(f"step {read[i - 1]:.0f} -> {read[i]:.0f} tok/s at {i * INTERVAL:.0f} s; "
          f"ordered at {(i + 1) * INTERVAL:.0f} s "
          f"it serves at {ready:.0f} s; minute {args.minute} needs C = {need:.0f} tok/s held from {start:.0f} s "
          f"({need / args.capacity:.1f} replicas at {args.capacity:.0f})")
    print(f"highest reading of the {args.seen:g} s before the step M = {seen:.0f} tok/s: k >= C/M = {x:.2f}")
    print(f"holding k x the {args.seen:g}-s rolling maximum everywhere: mean {x * mean_roll:.0f} tok/s = "
          f"{x * mean_roll / args.capacity:.1f} replicas, "
          f"{x * mean_roll / args.capacity * hours:.2f} GPU-h of prefill "
          f"over {args.minutes:g} min (at k = 1: {mean_roll / args.capacity * hours:.2f})")


if __name__ == "__main__":
    main()
