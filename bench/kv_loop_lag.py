"""How long a KV export stalls the caller's event loop: as before (on that loop) and now (in threads).

    .venv/bin/python -P bench/kv_loop_lag.py [--mib 64] [--block-kib 3072] [--reps 5]

Starts Debian's redis-server on a free loopback port, then per rep and per mode writes `--mib` MiB
the way the simulator's P/D export does (stand-in KV in blocks of `--block-kib`, described and
written), while a 5 ms timer on the caller's loop records how late it wakes
(`kvpilot.testing.loop_lag`). Modes: `before` (built on the caller's loop and written as one
asyncio pipeline there: `put_on_loop`, what `RedisStore.put` did) and `now` (built in a thread by
`KVAgent.off_loop`, written by `RedisStore` in its threads). Reports each mode's median over reps
of the worst and p99 lag, and the write time.
Results: bench/results/kv_transfer.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.store import BlockDescriptor, RedisStore, checksum
from kvpilot.sim.kv_connector import stand_in_kv
from kvpilot.testing.loop_lag import LagProbe, put_on_loop
from kvpilot.testing.redis import RedisServer


def sizes(total: int, block: int) -> list[int]:
    return [min(block, total - i) for i in range(0, total, block)]


async def now(url: str, rep: int, total: int, block: int) -> tuple[float, float, float]:
    """(worst lag, p99 lag, seconds) of one export through the agent and store."""
    agent = KVAgent("lag", RedisStore(url, namespace="lag", timeout_s=60))
    await agent.present(["warm-up"])  # connect before measuring
    keys = [f"now:{rep}:{i}" for i in range(len(sizes(total, block)))]

    def build() -> tuple[list[BlockDescriptor], list[bytes]]:
        buffers = [stand_in_kv(s) for s in sizes(total, block)]
        return agent.describe(keys, buffers), buffers

    async with LagProbe() as probe:
        t0 = time.perf_counter()
        descs, buffers = await agent.off_loop(build)
        await agent.post_write(descs, buffers).wait()
        seconds = time.perf_counter() - t0
    await agent.delete(keys)
    await agent.close()
    return probe.worst, probe.quantile(0.99), seconds


async def before(url: str, rep: int, total: int, block: int) -> tuple[float, float, float]:
    """The same export built and written on the caller's loop."""
    async with LagProbe() as probe:
        t0 = time.perf_counter()
        buffers = [stand_in_kv(s) for s in sizes(total, block)]
        blocks = [(f"before:{rep}:{i}", b) for i, b in enumerate(buffers)]
        for b in buffers:  # the descriptors' checksums, as describe() made them
            checksum(b)
        await put_on_loop(url, "lag", blocks)
        seconds = time.perf_counter() - t0
    await RedisStore(url, namespace="lag").delete([k for k, _ in blocks])
    return probe.worst, probe.quantile(0.99), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--block-kib", type=int, default=3072)  # 256 tokens × 12 KiB (the test profile)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    server = RedisServer()
    runs: dict[str, list[tuple[float, float, float]]] = {"before": [], "now": []}
    try:
        for rep in range(args.reps):  # interleaved, so load changes hit both modes alike
            for mode, export in (("before", before), ("now", now)):
                runs[mode].append(asyncio.run(export(server.url, rep, args.mib << 20, args.block_kib << 10)))
    finally:
        server.stop()
    print(f"| {args.mib} MiB export, {args.block_kib} KiB blocks | worst loop lag ms | p99 lag ms | "
          "write s |")
    print("|---|---:|---:|---:|")
    for mode, rows in runs.items():
        worst, p99, secs = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"| {mode} | {worst * 1e3:.0f} | {p99 * 1e3:.0f} | {secs:.2f} |")


if __name__ == "__main__":
    main()
