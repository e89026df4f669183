"""A long fuzzing run of the router's OpenAI surface: ≥ 10,000 generated requests, counted.

    .venv/bin/python -P bench/fuzz_router.py [--requests 10000] [--seed 0] [--out bench/results/fuzz_router.md]

One `kvpilot sim serve` worker and one `kvpilot router` in front of it, as real processes on
loopback. Requests come from the same strategies as tests/integration/router/test_fuzz.py
(`kvpilot.testing.fuzz`): typed-wrong, non-finite, huge and negative fields, unicode, deep nesting,
broken JSON, odd charsets, oversized bodies, and valid requests for a few tokens. Every answer must
be a 200 or a 4xx with an OpenAI-style error body; a 5xx or no answer within the client timeout
(30 s) is a problem. Nothing shrinks: every problem is counted and the first few are printed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from kvpilot.testing.fuzz import Case, cases, send
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append a markdown summary here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    worker = SimWorker("--profile", "h100-qwen2.5-0.5b", "--time-scale", "50")
    router = RouterProcess([{"name": "sim-model", "endpoints": [{"name": "w0", "url": worker.url}]}])
    statuses: Counter[int] = Counter()
    problems: list[str] = []
    started = time.monotonic()
    try:
        @hypothesis_seed(args.seed)
        @settings(max_examples=args.requests, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(cases())
        def one(case: Case) -> None:
            outcome = send("127.0.0.1", router.port, case)
            statuses[outcome.status] += 1
            if outcome.problem:
                problems.append(f"{case.path} {case.content_type!r} {case.body[:200]!r}: {outcome.problem}")

        one()
        alive = router.proc.alive() and router.healthy()
    finally:
        router.stop()
        worker.stop()
    wall = time.monotonic() - started
    total = sum(statuses.values())
    five = sum(n for s, n in statuses.items() if s >= 500)
    by_status = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
    lines = [f"requests {total} in {wall:.0f} s; by status: {by_status}",
             f"5xx: {five}; no answer (hang or dropped): {statuses[0]}; problems: {len(problems)}; "
             f"router alive after the run: {alive}",
             f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (2 cores)"]
    lines += [f"problem: {p}" for p in problems[:10]]
    print("\n".join(lines))
    if args.out:
        with args.out.open("a") as f:
            f.write("\n```\n$ .venv/bin/python -P bench/fuzz_router.py --requests "
                    f"{args.requests} --seed {args.seed}\n" + "\n".join(lines) + "\n```\n")
    raise SystemExit(1 if problems or not alive else 0)


if __name__ == "__main__":
    main()
