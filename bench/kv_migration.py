"""Live-migration blocking time: the stop-and-copy window, for 2k- and 16k-token contexts.

    .venv/bin/python -P bench/kv_migration.py [--contexts 2048 16384] [--migrations 10] [--profile h100-qwen2.5-0.5b]

Starts Debian's redis-server and two `kvpilot sim serve --kv-store redis://…` processes (real
time, the small-model profile: 12 KiB of KV per token), opens one streaming request per context
on the first, and migrates it back and forth `--migrations` times, acting as the router does
(reading the stream, following the `kvpilot.migrated` handoff to the target's continuation).

Reported per context: the source's blocking window (request paused → target's commit answer:
last delta written, pulled and checksummed by the target, request adopted), the whole migration
(pre-copy rounds included, during which the request keeps decoding), the rounds, and the
client-visible gap (last token before the handoff → first token after it) next to the median
inter-token gap. Results: bench/results/kv_migration.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import aiohttp

from kvpilot.kvtransfer import protocol
from kvpilot.router.migration import SseSplicer
from kvpilot.testing.redis import RedisServer
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text


async def run_context(a: SimWorker, b: SimWorker, ctx: int, migrations: int, settle_s: float) -> dict[str, Any]:
    rid = f"bench-{ctx}"
    headers = {protocol.REQUEST_ID: rid, protocol.MIGRATABLE: "1"}
    body = {"model": "sim-model", "prompt": block_text(ctx, ctx), "max_tokens": 100_000, "stream": True}
    times: list[float] = []
    handoffs: list[int] = []           # token index at which each continuation starts
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
        async def read() -> None:
            resp = await s.post(a.url + "/v1/completions", json=body, headers=headers)
            while True:
                splicer, handoff = SseSplicer(), None
                async for data in resp.content.iter_any():
                    out, handoff = splicer.feed(data)
                    now = time.monotonic()
                    times.extend(now for _ in range(out.count(b'"text"')))
                    if handoff is not None:
                        break
                resp.release()
                if handoff is None:
                    return
                handoffs.append(len(times))
                resp = await s.get(handoff.target + handoff.stream, headers=headers)

        reader = asyncio.create_task(read())
        while len(times) < 20:
            await asyncio.sleep(0.01)
        where = [a, b]
        for k in range(migrations):
            await asyncio.sleep(settle_s)
            src, dst = where[k % 2], where[(k + 1) % 2]
            ask = protocol.MigrateRequest(request_id=rid, target=dst.url)
            async with s.post(src.url + protocol.MIGRATE, json=ask.model_dump()) as r:
                results.append(await r.json())
            if results[-1].get("outcome") != "migrated":
                print(f"migration {k} of the {ctx}-token request: {results[-1]}", file=sys.stderr)
                break
            while len(handoffs) < k + 1 or len(times) <= handoffs[-1] + 2:  # the client is on the target
                await asyncio.sleep(0.005)
        reader.cancel()
    failed = [r for r in results if r.get("outcome") != "migrated"]
    ok = [r for r in results if r.get("outcome") == "migrated"]
    gaps = [times[i] - times[i - 1] for i in handoffs if 0 < i < len(times)]
    normal = [times[i] - times[i - 1] for i in range(1, len(times)) if i not in set(handoffs)]
    blocking = sorted(r["blocking_ms"] for r in ok)
    return {"context": ctx, "migrations": len(ok), "failed": len(failed),
            "blocking_ms_median": statistics.median(blocking), "blocking_ms_max": blocking[-1],
            "total_ms_median": statistics.median(r["total_ms"] for r in ok),
            "rounds_median": statistics.median(r["rounds"] for r in ok),
            "mb_median": statistics.median(r["bytes"] / 1e6 for r in ok),
            "client_gap_ms_median": statistics.median(gaps) * 1000, "client_gap_ms_max": max(gaps) * 1000,
            "itl_ms_median": statistics.median(normal) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--migrations", type=int, default=10)
    parser.add_argument("--settle", type=float, default=0.3, help="seconds of decoding between migrations")
    parser.add_argument("--profile", default="h100-qwen2.5-0.5b")
    args = parser.parse_args()
    redis = RedisServer()
    flags = ("--profile", args.profile, "--kv-store", redis.url)
    a, b = SimWorker(*flags), SimWorker(*flags)
    try:
        print("| context | migrations | blocking median ms | blocking max ms | client gap median / max ms "
              "| inter-token median ms | whole migration median ms | rounds | MB copied |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for ctx in args.contexts:
            r = asyncio.run(run_context(a, b, ctx, args.migrations, args.settle))
            print(f"| {ctx} | {r['migrations']} ({r['failed']} failed) | {r['blocking_ms_median']:.1f} | "
                  f"{r['blocking_ms_max']:.1f} | {r['client_gap_ms_median']:.1f} / {r['client_gap_ms_max']:.1f} | "
                  f"{r['itl_ms_median']:.1f} | {r['total_ms_median']:.0f} | {r['rounds_median']:.0f} | "
                  f"{r['mb_median']:.0f} |", flush=True)
    finally:
        a.stop()
        b.stop()
        redis.stop()


if __name__ == "__main__":
    main()
