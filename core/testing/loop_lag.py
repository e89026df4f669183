"""How late an event loop runs a coroutine while something else works on it: a periodic timer.

A task sleeps `period_s` over and over and records how much later than asked it woke. Work that
holds the loop (or the GIL) for 0.3 s shows as a 0.3 s sample; work done elsewhere shows as the
machine's scheduling noise. Used by the KV store's off-loop test and bench/kv_loop_lag.py.
"""

from __future__ import annotations

import asyncio
import struct
import time
from types import TracebackType

import redis.asyncio as aioredis
import xxhash

_HEADER = struct.Struct(">QII")  # kvpilot.kvtransfer.store's block header


class LagProbe:
    """`async with LagProbe() as probe:` … then `probe.worst`, `probe.quantile(0.99)`."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self.samples: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.samples.append(max(0.0, time.perf_counter() - t - self.period_s))

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)  # the first tick is armed before the measured work starts
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.sleep(self.period_s * 2)  # a stall that ends with the work still counts
        self._stop.set()
        if self._task is not None:
            await self._task

    @property
    def worst(self) -> float:
        return max(self.samples, default=0.0)

    def quantile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def put_on_loop(url: str, namespace: str, blocks: list[tuple[str, bytes]], chunk_bytes: int = 512 * 1024,
                      ttl_s: int = 300) -> None:
    """The reference: `blocks` written as one asyncio Redis pipeline on the running loop, in the
    store's key schema (chunks, then the header), as `RedisStore.put` did before it used threads."""
    client = aioredis.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for key, data in blocks:
            k = f"kvp:{namespace}:blk:{key}"
            chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
            for i, chunk in enumerate(chunks):
                pipe.set(f"{k}:{i}", chunk, ex=ttl_s)
            pipe.set(k, _HEADER.pack(xxhash.xxh64_intdigest(data), len(data), len(chunks)), ex=ttl_s)
        await pipe.execute()
    finally:
        await client.aclose()
