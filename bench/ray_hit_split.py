"""Where each router's cache hits went, from `bench/ray_routing.py --requests-out`: the gap between
its engine-side hit rate and the workload's ceiling, split into what placement lost and what
timing lost.

    .venv/bin/python -P bench/ray_hit_split.py --workload agentic --seed 1 --requests 300 \\
        bench/results/ray_requests_s15_agentic.jsonl.gz

The ceiling: one cache holding every prompt forever, so each request hits the longest prefix any
earlier request sent (capped, as vLLM does, one token short of the prompt). Placement lost the
part of that prefix that went only to other replicas than this request's; timing lost the rest of
the gap: the prefix went to this replica but was not cached when this request was scheduled (still
being prefilled: an open-loop replay sends a session's next turn at its trace time, even while the
previous one is queued) or was evicted. A router decides placement; timing it moves only through
the replicas' queues, which is where the same router's repeats differ. Placement's share is an
upper bound on what placement lost: a prefix sent only elsewhere counts even where that replica
has evicted it since, and no choice could have hit it.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from kvpilot.router.hot_prefixes import common_blocks
from kvpilot.sim.families import make_workload
from kvpilot.sim.profiles import get_profile

BLOCK = get_profile("h100-llama3-8b").block_size   # the profile bench/ray_routing.py's replicas run


def split(workload: str, requests: int, seed: int, rate: float, served: dict[str, dict[str, Any]]) -> Counter[str]:
    """Token totals for one step: prompt, cached (the engines'), ceiling, and held here (the longest
    earlier prefix sent to the replica that served each request)."""
    specs = sorted(make_workload(workload, requests, rate, seed), key=lambda s: s.arrival)
    sent: list[tuple[tuple[int, ...], str]] = []
    total: Counter[str] = Counter()
    for spec in specs:
        row = served[spec.request_id]
        hashes = tuple(spec.block_hashes(BLOCK))
        cap = spec.prompt_tokens - 1
        ceiling = max((common_blocks(hashes, h) for h, _ in sent), default=0) * BLOCK
        here = max((common_blocks(hashes, h) for h, replica in sent if replica == row["replica"]), default=0) * BLOCK
        total.update(prompt=spec.prompt_tokens, cached=row["cached"], ceiling=min(cap, ceiling), here=min(cap, here))
        sent.append((hashes, row["replica"]))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="mooncake")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("files", type=Path, nargs="+", help="JSON lines from ray_routing.py --requests-out (.gz too)")
    args = ap.parse_args()
    steps: dict[tuple[float, int, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for path in args.files:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        for line in text.splitlines():
            row = json.loads(line)
            steps[(row["rate"], row["repeat"], row["router"])][row["request"]] = row
    print("| req/s | repeat | router | hit rate | ceiling | lost to placement | lost to timing |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (rate, repeat, router), served in sorted(steps.items()):
        t = split(args.workload, args.requests, args.seed, rate, served)
        p = t["prompt"]
        print(f"| {rate:g} | {repeat} | {router} | {t['cached'] / p:.2%} | {t['ceiling'] / p:.2%} | "
              f"{(t['ceiling'] - t['here']) / p:.2%} | {(t['here'] - t['cached']) / p:.2%} |")


if __name__ == "__main__":
    main()
