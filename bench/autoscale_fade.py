"""The pd workload's short→long cross-fade against a pool that holds few replicas when it begins:
how many of minute 15's requests wait past the TTFT SLO on the replicas already serving, before
anything ordered at the fade's first sign can serve. A bound for any causal policy, not a run of
one: arrivals are replayed FIFO through `replicas` replicas' worth of prefill (`capacity` tok/s
each, the rate one replica computed while overloaded in the traced run) from 900 s until
`ready` s (a replica ordered at 910 s, the first reading that shows the fade, serves at 970 s);
requests queued there stay there (engine-local queues, as in vLLM).

    .venv/bin/python -P bench/autoscale_fade.py --seed 0 [--replicas 1] [--capacity 25500] [--ready 970]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("autoscale_workloads",
                                               Path(__file__).with_name("autoscale_workloads.py"))
assert _spec is not None and _spec.loader is not None
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicas", type=int, default=1, help="replicas serving when the fade begins")
    ap.add_argument("--capacity", type=float, default=25_500.0, help="prompt tok/s one replica computes")
    ap.add_argument("--ready", type=float, default=970.0, help="when the first replica ordered for the fade serves, s")
    ap.add_argument("--slo", type=float, default=2.0, help="TTFT SLO, s")
    args = ap.parse_args()
    specs = sorted(W.WORKLOADS["pd"](30, args.seed), key=lambda s: s.arrival)
    print("prompt tok/s arrived per 10 s from 880 s:",
          [round(sum(s.prompt_tokens for s in specs if lo <= s.arrival < lo + 10) / 10) for lo in range(880, 1010, 10)])
    cap = args.capacity * args.replicas
    backlog, t, late = 0.0, 900.0, 0
    minute = [s for s in specs if 900 <= s.arrival < 960]
    for s in (s for s in specs if 900 <= s.arrival < min(960.0, args.ready)):
        backlog = max(0.0, backlog - cap * (s.arrival - t)) + s.prompt_tokens
        t = s.arrival
        late += backlog / cap > args.slo
    print(f"minute 15: {len(minute)} requests, {late} wait > {args.slo:g} s on {args.replicas} replica(s) "
          f"({cap:.0f} tok/s) until {args.ready:.0f} s: {1 - late / len(minute):.1%} in SLO (the minute needs 90%)")


if __name__ == "__main__":
    main()
