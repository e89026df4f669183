"""Blocks spread over several stores by rendezvous hashing: found where written, few moved on growth."""

from __future__ import annotations

import asyncio

from kvpilot.kvtransfer.store import MemoryStore, ShardedStore


def test_round_trip_spreads_blocks_and_keeps_order() -> None:
    shards = [MemoryStore() for _ in range(3)]
    store = ShardedStore(list(shards))
    blocks = [(f"{i:016x}", bytes([i % 251]) * (i + 1)) for i in range(300)]
    asyncio.run(store.put(blocks))
    assert all(len(s.blocks) > 50 for s in shards)                   # every shard holds a share
    keys = [k for k, _ in reversed(blocks)] + ["missing"]
    got = asyncio.run(store.get(keys))
    assert got[:-1] == [d for _, d in reversed(blocks)] and got[-1] is None
    asyncio.run(store.delete([k for k, _ in blocks[:100]]))
    assert asyncio.run(store.get([blocks[0][0], blocks[200][0]])) == [None, blocks[200][1]]


def test_adding_a_shard_moves_only_the_keys_it_wins() -> None:
    keys = [f"{i:016x}" for i in range(20_000)]
    three = ShardedStore([MemoryStore() for _ in range(3)], ["a", "b", "c"])
    four = ShardedStore([MemoryStore() for _ in range(4)], ["a", "b", "c", "d"])
    moved = [k for k in keys if three.shard_of(k) != four.shard_of(k)]
    assert all(four.shard_of(k) == 3 for k in moved)                  # only to the new shard
    assert 0.22 < len(moved) / len(keys) < 0.28                       # ≈ 1/4
