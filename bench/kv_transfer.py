"""KV transfer throughput to Redis on loopback, by block size.

    .venv/bin/python -P bench/kv_transfer.py [--sizes 16384 131072 1048576 4194304] [--total-mb 256]

Starts Debian's redis-server on a free loopback port (no persistence), then for each block size
writes `--total-mb` of random blocks through a `KVAgent` in batches of `--batch` blocks and reads
them back with checksum verification; reports MB/s each way. Block sizes are KV sizes: 16 KiB is
~1 token of Llama-8B (128 KiB/token) ×1/8, 2 MiB is 16 tokens of Llama-8B (one vLLM block).
Results: bench/results/kv_transfer.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import redis

from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.store import RedisStore
from kvpilot.testing.redis import RedisServer


async def measure(url: str, size: int, total: int, batch: int) -> tuple[float, float]:
    store = RedisStore(url, namespace=f"bench{size}", timeout_s=30)
    agent = KVAgent("bench", store)
    n = max(batch, total // size)
    payload = [os.urandom(size) for _ in range(min(n, 64))]  # reuse buffers: RNG is not what we measure
    keys = [f"b{i}" for i in range(n)]
    descs = [agent.describe([k], [payload[i % len(payload)]])[0] for i, k in enumerate(keys)]
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        buffers = [payload[j % len(payload)] for j in range(i, min(n, i + batch))]
        await agent.post_write(descs[i : i + batch], buffers).wait()
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        await agent.post_read(descs[i : i + batch]).wait()
    read_s = time.perf_counter() - t0
    redis.Redis.from_url(url).flushdb()  # the store's own client lives on the agent's I/O loop
    await agent.close()
    mb = n * size / 1e6
    return mb / write_s, mb / read_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[16 * 1024, 128 * 1024, 2 * 1024 * 1024,
                                                                  8 * 1024 * 1024])
    parser.add_argument("--total-mb", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    server = RedisServer()
    try:
        print("| block size | blocks | write MB/s | read MB/s (checksummed) |")
        print("|---:|---:|---:|---:|")
        for size in args.sizes:
            w, r = asyncio.run(measure(server.url, size, args.total_mb * 1_000_000, args.batch))
            n = max(args.batch, args.total_mb * 1_000_000 // size)
            print(f"| {size // 1024} KiB | {n} | {w:,.0f} | {r:,.0f} |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
