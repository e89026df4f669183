"""Real-time simulator server: maximum sustained streaming requests per second per process.

    .venv/bin/python -P bench/sim_server_rps.py [--rates 100 200 400 800] [--seconds 10]

Starts one `kvpilot sim serve` process (Qwen2.5-0.5B/H100 profile, so the modelled GPU is never
the limit and the server's own HTTP/SSE/engine-loop overhead is what is measured) and drives it
open-loop from this process with aiohttp at each offered rate for a bounded time: 128-token
prompts, 16 streamed output tokens. A rate is sustained when ≥ 99% of the offered requests
complete and the achieved rate is within 5% of the offered one. Results:
bench/results/sim_server_rps.md.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import aiohttp

from kvpilot.sim.cluster import percentile
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text


async def drive(url: str, rate: float, seconds: float, model: str | None = None,
                statuses: Counter[str] | None = None) -> tuple[int, int, float, list[float]]:
    """Open-loop streaming load; `statuses`, when given, counts answers by HTTP status (or error)."""
    n = int(rate * seconds)
    ttfts: list[float] = []
    done = 0
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, at: float) -> None:
            nonlocal done, errors
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            sent = time.monotonic()
            body = {"prompt": block_text(i % 512, 128), "max_tokens": 16, "stream": True,
                    **({"model": model} if model else {})}
            try:
                async with session.post(url + "/v1/completions", json=body) as resp:
                    first = True
                    async for line in resp.content:
                        if first and line.startswith(b"data: {"):
                            ttfts.append(time.monotonic() - sent)
                            first = False
                    done += resp.status == 200
                    errors += resp.status != 200
                    if statuses is not None:
                        statuses[str(resp.status)] += 1
            except aiohttp.ClientError as e:
                errors += 1
                if statuses is not None:
                    statuses[type(e).__name__] += 1

        start = time.monotonic() + 0.5
        t0 = time.monotonic()
        await asyncio.gather(*(one(i, start + i / rate) for i in range(n)))
        wall = time.monotonic() - t0 - 0.5
    return done, errors, wall, ttfts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    worker = SimWorker("--profile", "h100-qwen2.5-0.5b")
    try:
        print("| offered req/s | completed | errors | achieved req/s | TTFT p50 ms | TTFT p99 ms | sustained |")
        print("|---:|---:|---:|---:|---:|---:|:---:|")
        for rate in args.rates:
            done, errors, wall, ttfts = asyncio.run(drive(worker.url, rate, args.seconds))
            offered = int(rate * args.seconds)
            achieved = done / wall
            ok = done >= 0.99 * offered and achieved >= 0.95 * rate
            print(f"| {rate:.0f} | {done}/{offered} | {errors} | {achieved:.0f} | {percentile(ttfts, 50) * 1e3:.1f} | "
                  f"{percentile(ttfts, 99) * 1e3:.1f} | {'yes' if ok else 'no'} |", flush=True)
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
