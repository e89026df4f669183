"""The CPU vLLM engine's cost of a step whose token count it has not run lately (the cause of the
simulator's low TTFTs in bench/results/sim_fidelity.md before `Profile.new_shape_s`).

    .venv/bin/python -P bench/cpu_new_shape.py [--pairs 10] [--back 30,150,260,400,520] [--env K=V ...]

Starts the `vllm` test tier's CPU engine (tiny model, core 0, nice -10) and sends single prefills
of exact token counts (token-id prompts, `max_tokens` 1), reading vLLM's own prefill time
(`request_prefill_time_seconds`, two /metrics scrapes around each request):
1. by length: a count not sent before, then the same count again, --pairs times per length group;
2. cache depth: after 560 distinct counts, a count seen `back` distinct counts ago, then again.
A difference (first − again) well above 0 means the step built its kernels. `--env
ONEDNN_PRIMITIVE_CACHE_CAPACITY=8192` shows which cache keeps them. Results: bench/results/sim_fidelity.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
from pathlib import Path

import aiohttp

from kvpilot.sim.calibrate import prefill_time_total


async def prefill(session: aiohttp.ClientSession, url: str, tokens: int, rng: random.Random,
                  timed: bool = True) -> float:
    """vLLM's own prefill time (ms) of one request of exactly `tokens` random token ids."""
    before = await prefill_time_total(session, url) if timed else None
    body = {"model": "tiny", "prompt": [rng.randrange(10, 4000) for _ in range(tokens)], "max_tokens": 1}
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        await resp.read()
    if before is None:
        return 0.0
    after = await prefill_time_total(session, url)
    assert after is not None and after[1] - before[1] == 1
    return 1e3 * (after[0] - before[0])


async def run(url: str, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    used: set[int] = set()

    def fresh(lo: int, hi: int) -> int:
        while (n := rng.randint(lo, hi)) in used:
            pass
        used.add(n)
        return n

    async with aiohttp.ClientSession() as session:
        for n in (64, 128, 256, 512, 900):   # warm-up: first-request costs
            await prefill(session, url, n, rng, timed=False)
        groups = [100, 250, 400, 550, 700, 850]
        diffs: dict[int, list[tuple[float, float]]] = {g: [] for g in groups}
        order = groups * args.pairs
        rng.shuffle(order)
        for g in order:
            n = fresh(g - 40, g + 40)
            diffs[g].append((await prefill(session, url, n, rng), await prefill(session, url, n, rng)))
        print("| tokens | first (ms) | again (ms) | median difference (ms) | differences |")
        print("|---:|---:|---:|---:|---|")
        for g in groups:
            d = sorted(a - b for a, b in diffs[g])
            print(f"| {g}±40 | {statistics.median(a for a, _ in diffs[g]):.1f} | "
                  f"{statistics.median(b for _, b in diffs[g]):.1f} | {statistics.median(d):.1f} | "
                  f"{' '.join(f'{x:.1f}' for x in d)} |")
        seq = [fresh(100, 1000) for _ in range(560)]
        for n in seq:
            await prefill(session, url, n, rng, timed=False)
        print("\n| distinct counts since | first − again (ms), 3 counts |\n|---:|---|")
        for back in sorted(args.back, reverse=True):   # oldest first: a re-run never evicts a later one
            out = []
            for j in range(3):
                n = seq[len(seq) - back + 3 * j]
                out.append(await prefill(session, url, n, rng) - await prefill(session, url, n, rng))
            print(f"| {back} | {' '.join(f'{x:.1f}' for x in out)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--back", type=lambda s: [int(x) for x in s.split(",")], default=[30, 150, 260, 400, 520])
    parser.add_argument("--env", nargs="*", default=[], help="K=V for the engine's environment")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    from kvpilot.testing.vllm import VLLMServer

    os.setpriority(os.PRIO_PROCESS, 0, -10)
    env = dict(kv.split("=", 1) for kv in args.env)
    server = VLLMServer.tiny(name="shape", workdir=Path(tempfile.mkdtemp(prefix="kvpilot-shape-")), cpu=0, nice=-10,
                             env=env)
    try:
        print(f"load average {os.getloadavg()[0]:.1f}, engine env {env}")
        asyncio.run(run(server.url, args))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
