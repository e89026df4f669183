"""The KV block store over real Redis, and P/D with real bytes between simulator processes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from kvpilot.kvtransfer.agent import KVAgent, XferState
from kvpilot.kvtransfer.store import BlockDescriptor, MemoryStore, RedisStore, TransferError, checksum
from kvpilot.testing.redis import RedisServer
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text

Workers = Callable[..., SimWorker]


def test_round_trip_with_chunking_and_checksums(redis_server: RedisServer) -> None:
    async def run() -> None:
        store = RedisStore(redis_server.url, namespace="t1", chunk_bytes=64 * 1024)
        agent = KVAgent("a", store)
        buffers = [os.urandom(1000), os.urandom(300 * 1024), b""]  # inline, chunked, empty
        descs = agent.describe(["x", "y", "z"], buffers)
        await agent.post_write(descs, buffers).wait()
        handle = agent.post_read(descs)
        assert await handle.wait() == buffers and handle.state == XferState.DONE
        assert agent.bytes_moved == 2 * sum(len(b) for b in buffers)
        await agent.close()

    asyncio.run(run())
    r = redis.Redis.from_url(redis_server.url)
    assert r.exists("kvp:t1:blk:y:0") and r.exists("kvp:t1:blk:y:4") and not r.exists("kvp:t1:blk:y:5")
    assert 0 < r.ttl("kvp:t1:blk:x") <= 300

    async def delete() -> None:
        store = RedisStore(redis_server.url, namespace="t1", chunk_bytes=64 * 1024)
        await store.delete(["x", "y"])
        assert await store.get(["x", "y", "z"]) == [None, None, b""]
        await store.close()

    asyncio.run(delete())
    assert r.keys("kvp:t1:blk:y*") == [] and r.keys("kvp:t1:blk:*") == [b"kvp:t1:blk:z"]  # chunks went too


def test_corrupt_or_missing_blocks_fail_the_transfer(redis_server: RedisServer) -> None:
    async def run() -> None:
        store = RedisStore(redis_server.url, namespace="t2", chunk_bytes=1024)
        agent = KVAgent("a", store)
        data = os.urandom(4096)
        await agent.post_write(agent.describe(["b"], [data]), [data]).wait()
        redis.Redis.from_url(redis_server.url).set("kvp:t2:blk:b:2", b"x" * 1024)  # flip a chunk
        with pytest.raises(TransferError, match="corrupt"):
            await agent.post_read([BlockDescriptor("b", 4096, checksum(data))]).wait()
        with pytest.raises(TransferError, match="not in the store"):
            await agent.post_read([BlockDescriptor("never", 1)]).wait()
        assert agent.failures == 2
        await agent.close()

    asyncio.run(run())


def test_a_transfer_larger_than_one_round_trips_deadline_completes(redis_server: RedisServer) -> None:
    """512 MiB against a 0.5 s deadline per round trip: as one pipeline it would need > 1 GB/s
    through redis-py (this machine does ~0.3-1); in 4 MiB round trips each needs 8 MB/s. The
    deadline is for a stuck store, not a large transfer (an 8B handover round is ~768 MiB)."""
    inline, chunked = os.urandom(256 * 1024), os.urandom(2 * 1024 * 1024)
    blocks = [(f"i{n}", inline) for n in range(512)] + [(f"c{n}", chunked) for n in range(192)]

    async def run() -> None:
        store = RedisStore(redis_server.url, namespace="big", timeout_s=0.5, round_trip_bytes=4 * 1024 * 1024)
        try:
            await store.put(blocks)
            got = await store.get([key for key, _ in blocks])
            assert [len(g or b"") for g in got] == [len(data) for _, data in blocks]
            assert all(g == data for g, (_, data) in zip(got, blocks, strict=True))
            await store.delete([key for key, _ in blocks])
            assert await store.exists([key for key, _ in blocks]) == [False] * len(blocks)
        finally:
            await store.close()

    asyncio.run(run())
    assert redis.Redis.from_url(redis_server.url).keys("kvp:big:*") == []   # chunks deleted too


def test_memory_store_has_the_same_contract() -> None:
    async def run() -> None:
        agent = KVAgent("m", MemoryStore())
        bufs = [b"abc", b"defg"]
        descs = agent.describe(["1", "2"], bufs)
        await agent.post_write(descs, bufs).wait()
        assert await agent.post_read(descs).wait() == bufs
        with pytest.raises(TransferError):
            await agent.post_read([BlockDescriptor("1", 3, checksum(b"xyz"))]).wait()

    asyncio.run(run())


def _metric(worker: SimWorker, name: str) -> float:
    for line in worker.metrics_text().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _pd(prefill: SimWorker, decode: SimWorker, prompt: str) -> str:
    first = prefill.openai_client().completions.create(
        model="sim-model", prompt=prompt, max_tokens=1, extra_body={"kv_transfer_params": {"do_remote_decode": True}})
    params = first.model_extra["kv_transfer_params"]  # type: ignore[index]
    second = decode.openai_client().completions.create(model="sim-model", prompt=prompt, max_tokens=6,
                                                       extra_body={"kv_transfer_params": params})
    return second.choices[0].text


def test_pd_handoff_moves_the_right_bytes_through_redis(redis_server: RedisServer, sim_worker_factory: Workers) -> None:
    flags = ("--profile", "h100-qwen2.5-0.5b", "--kv-store", redis_server.url)
    prefill, decode = sim_worker_factory(*flags), sim_worker_factory(*flags)
    text = _pd(prefill, decode, block_text(21, 1000))
    assert len(text.split()) == 6
    kv_bytes = 12 * 1024  # h100-qwen2.5-0.5b: 12 KiB per token
    assert _metric(decode, "vllm:nixl_bytes_transferred_total") == 1000 * kv_bytes
    assert _metric(decode, "vllm:nixl_num_failed_transfers_total") == 0
    assert 'source="external_kv_transfer"} 999.0' in decode.metrics_text()
    assert redis.Redis.from_url(redis_server.url).keys("kvp:sim:blk:*")  # the blocks went through Redis


def test_redis_down_degrades_to_recompute_and_counts_the_failure(tmp_path: Path, sim_worker_factory: Workers) -> None:
    server = RedisServer(tmp_path / "redis")
    flags = ("--profile", "h100-qwen2.5-0.5b", "--kv-store", server.url)
    prefill, decode = sim_worker_factory(*flags), sim_worker_factory(*flags)
    prompt = block_text(22, 800)
    first = prefill.openai_client().completions.create(
        model="sim-model", prompt=prompt, max_tokens=1, extra_body={"kv_transfer_params": {"do_remote_decode": True}})
    params = first.model_extra["kv_transfer_params"]  # type: ignore[index]
    server.stop()  # Redis dies between the prefill's write and the decode's read
    out = decode.openai_client().completions.create(model="sim-model", prompt=prompt, max_tokens=6,
                                                    extra_body={"kv_transfer_params": params})
    assert len(out.choices[0].text.split()) == 6  # the request still completes
    assert _metric(decode, "vllm:nixl_num_failed_transfers_total") == 1
    assert 'source="local_compute"} 800.0' in decode.metrics_text()  # it recomputed the prompt


def test_pd_handoff_sharded_over_two_redis_servers(redis_server: RedisServer, sim_worker_factory: Workers,
                                                   tmp_path: Path) -> None:
    second = RedisServer(tmp_path / "redis-2")
    redis.Redis.from_url(redis_server.url).flushdb()  # earlier tests' blocks must not count here
    try:
        flags = ("--profile", "h100-qwen2.5-0.5b", "--kv-store", f"{redis_server.url},{second.url}")
        prefill, decode = sim_worker_factory(*flags), sim_worker_factory(*flags)
        # 16 blocks of 256 tokens, keyed by request id: all on one shard by chance is 2 × 2^-16.
        assert len(_pd(prefill, decode, block_text(22, 4096)).split()) == 6
        assert _metric(decode, "vllm:nixl_bytes_transferred_total") == 4096 * 12 * 1024  # every byte arrived
        assert _metric(decode, "vllm:nixl_num_failed_transfers_total") == 0
        assert redis.Redis.from_url(redis_server.url).keys("kvp:sim:blk:*")   # both shards hold blocks
        assert redis.Redis.from_url(second.url).keys("kvp:sim:blk:*")
    finally:
        second.stop()
