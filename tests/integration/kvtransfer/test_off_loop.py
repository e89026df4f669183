"""KV transfers run off the caller's event loop: a 64 MiB export leaves that loop running.

The caller's loop is an engine's (the simulator steps on it) or a proxy's. Before, the simulator's
P/D export built its stand-in KV and ran the Redis pipeline on it, which held the loop for 0.29 s
per 64 MiB on a quiet machine and seconds on a loaded one. The lag test measures a 5 ms timer on
the caller's loop during the same 64 MiB export done both ways in one run (that old way being
`put_on_loop`), so machine load weighs on both alike.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.store import BlockDescriptor, RedisStore, TransferError
from kvpilot.procs import free_port
from kvpilot.sim.kv_connector import stand_in_kv
from kvpilot.testing.loop_lag import LagProbe, put_on_loop
from kvpilot.testing.redis import RedisServer

MIB = 1 << 20
BLOCK = 3 * MIB  # 256 tokens × 12 KiB: one P/D block of the test profile


def _sizes(total: int) -> list[int]:
    return [min(BLOCK, total - i) for i in range(0, total, BLOCK)]


async def _export(agent: KVAgent, tag: str, total: int = 64 * MIB) -> list[BlockDescriptor]:
    """The simulator's P/D export now: stand-in KV built, described and written through the agent."""
    keys = [f"{tag}:{i}" for i in range(len(_sizes(total)))]

    def build() -> tuple[list[BlockDescriptor], list[bytes]]:
        buffers = [stand_in_kv(s) for s in _sizes(total)]
        return agent.describe(keys, buffers), buffers

    descs, buffers = await agent.off_loop(build)
    await agent.post_write(descs, buffers).wait()
    return descs


async def _lag_now(url: str, tag: str) -> float:
    agent = KVAgent("lag", RedisStore(url, namespace="lag", timeout_s=60))
    await agent.present(["connect"])
    async with LagProbe() as probe:
        descs = await _export(agent, tag)
        got = await agent.post_read(descs).wait()
    assert sum(len(b) for b in got) == 64 * MIB  # every byte arrived, verified
    await agent.delete([d.key for d in descs])
    await agent.close()
    return probe.worst


async def _lag_before(url: str, tag: str) -> float:
    async with LagProbe() as probe:
        buffers = [stand_in_kv(s) for s in _sizes(64 * MIB)]
        await put_on_loop(url, "lag", [(f"{tag}:{i}", b) for i, b in enumerate(buffers)])
    return probe.worst


async def _lag_idle() -> float:
    """The loop's own noise on this machine now: the probe with nothing else on the loop."""
    async with LagProbe() as probe:
        await asyncio.sleep(0.3)
    return probe.worst


def test_a_64_mib_export_does_not_stall_the_callers_loop(redis_server: RedisServer) -> None:
    idle, before, now = [], [], []
    for rep in range(3):  # interleaved; the best of three each is the least disturbed by other load
        idle.append(asyncio.run(_lag_idle()))
        before.append(asyncio.run(_lag_before(redis_server.url, f"a{rep}")))
        now.append(asyncio.run(_lag_now(redis_server.url, f"b{rep}")))
    # On the loop the whole pipeline holds it (0.1-0.3 s); in threads the loop waits only for
    # GIL hand-overs (~10 ms per 64 MiB measured, where an asyncio client in a thread gave ~100).
    # The self-check is relative to the idle loop's noise measured alongside, not an absolute
    # time: a faster machine stalls for less, and the test still measures something while the
    # old way's stall stands an order of magnitude above that noise.
    assert min(before) > 10 * max(min(idle), 0.001), (
        f"the old way ({before} s) did not stall the loop beyond its idle noise ({idle} s): "
        "the test measures nothing")
    # A third, not a quarter: since the store reads the socket in 1 MiB pieces (cf99f84, block
    # reads +20-30%) each read holds the GIL longer; a CI run with the e2e tier alongside measured
    # 28-32 ms against 103-120 ms on the loop (6-7 ms against 113-124 quiet).
    assert min(now) < min(before) / 3, f"worst loop lag now {now} s vs on the loop {before} s"


def test_redis_down_is_a_counted_failure_not_a_hang() -> None:
    async def run() -> None:
        agent = KVAgent("down", RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5))
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            await _export(agent, "x", total=4 * MIB)
        with pytest.raises(TransferError):
            await agent.post_read([BlockDescriptor("x:0", 1)]).wait()
        with pytest.raises(TransferError):
            await agent.present(["x:0"])
        assert time.monotonic() - t0 < 10 and agent.failures == 2  # the two posted transfers
        await agent.close()
        with pytest.raises(TransferError, match="closed"):  # after close: a failure, not a hang
            await agent.post_write([BlockDescriptor("y", 1)], [b"y"]).wait()

    asyncio.run(run())


def test_a_slow_store_fails_within_the_timeout() -> None:
    """A Redis that accepts and never answers (stopped) fails each round trip in `timeout_s`."""
    server = RedisServer()
    try:
        async def run() -> None:
            agent = KVAgent("slow", RedisStore(server.url, namespace="slow", timeout_s=0.5))
            await agent.present(["connect"])
            os.kill(server.proc.pid, signal.SIGSTOP)  # the socket stays open, nothing answers
            t0 = time.monotonic()
            with pytest.raises(TransferError):
                await _export(agent, "s", total=4 * MIB)
            assert time.monotonic() - t0 < 3
            await agent.close()

        asyncio.run(run())
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)  # so that it can stop
        server.stop()
