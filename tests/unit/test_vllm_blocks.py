"""The vLLM connector's decisions: keys, leading hits, what each step loads and saves, P/D waiting."""

from __future__ import annotations

import asyncio
import importlib

import pytest

from kvpilot.kvtransfer.store import MemoryStore, ShardedStore, TransferError
from kvpilot.kvtransfer.vllm_blocks import (
    BlockPlanner,
    block_key,
    join_layers,
    leading_hits,
    loadable_blocks,
    namespace,
    rank_present,
    split_layers,
)

BS = 4
H = [bytes([i]) * 8 for i in range(10)]  # stand-ins for vLLM's chained block hashes


def ns(**over: object) -> str:
    base: dict[str, object] = dict(model="/models/tiny", revision=None, dtype="float32", cache_dtype="auto",
                                   block_size=128, num_layers=2, num_kv_heads=2, head_size=32, tp_size=1, device="cpu")
    return namespace(**{**base, **over})  # type: ignore[arg-type]


def test_namespace_separates_every_layout_parameter() -> None:
    variants = [ns(), ns(model="/models/other"), ns(revision="abc"), ns(dtype="bfloat16"), ns(cache_dtype="fp8"),
                ns(block_size=16), ns(num_layers=3), ns(num_kv_heads=4), ns(head_size=64), ns(tp_size=2),
                ns(device="cuda")]
    assert len(set(variants)) == len(variants)
    assert ns() == ns() and ns().startswith("vllm:tiny:float32:bs128:")


def test_keys_leading_hits_and_limits() -> None:
    assert block_key(b"\x01\xff", 3) == "01ff:r3"
    assert leading_hits([True, True, False, True]) == 2 and leading_hits([]) == 0
    assert loadable_blocks(9, BS, 5) == 2      # 9 tokens: blocks 0-1 full, the last token must be computed
    assert loadable_blocks(8, BS, 2) == 1      # exactly 2 full blocks: keep the last token → 1
    assert loadable_blocks(100, BS, 3) == 3    # no more than the hashes vLLM has
    assert rank_present([True, True, True, False, True, True], 2) == [True, False, True]


def test_layers_round_trip_and_reject_a_wrong_size() -> None:
    value = join_layers([b"aaaa", b"bbbb", b"cccc"])
    assert split_layers(value, 3) == [b"aaaa", b"bbbb", b"cccc"]
    with pytest.raises(ValueError):
        split_layers(value[:-1], 3)
    with pytest.raises(ValueError):
        join_layers([b"aa", b"bbb"])


def test_new_request_loads_leading_store_hits_beyond_the_local_cache() -> None:
    p = BlockPlanner(BS)
    # 22 tokens: 5 full blocks, 5 loadable; store holds 0-2 and 4; 1 block hit locally.
    n = p.matched("r", 22, H[:5], local_tokens=BS, present=[True, True, True, False, True])
    assert n == 2 * BS
    p.allocated("r", H[:5], [10, 11, 12, 13, 14, 15], external_tokens=n)
    ops = p.step([("r", 22, [10, 11, 12, 13, 14, 15], H[:5])])
    assert [(o.req_id, o.load) for o in ops] == [("r", [(11, H[1]), (12, H[2])])]
    # ... and saves what the store lacked once it is computed: blocks 3 and 4 (not 0-2).
    assert ops[0].save == [(13, H[3]), (14, H[4])]


def test_decode_saves_each_block_as_it_fills_once() -> None:
    p = BlockPlanner(BS)
    assert p.matched("r", 6, H[:1], local_tokens=0, present=[False]) == 0
    p.allocated("r", H[:1], [7, 8], external_tokens=0)
    ids = [7, 8]
    first = p.step([("r", 6, ids, H[:1])])
    assert first[0].save == [(7, H[0])] and first[0].load == []
    assert p.step([("r", 7, ids, H[:1])]) == []                  # block 1 not full yet
    again = p.step([("r", 8, ids, H[:2])])                        # token 8 fills block 1
    assert again[0].save == [(8, H[1])]
    assert p.step([("r", 9, [*ids, 9], H[:2])]) == []
    assert p.finished("r") is not None and p.finished("r") is None


def test_consumer_saves_nothing() -> None:
    p = BlockPlanner(BS, save=False)
    p.matched("r", 12, H[:3], local_tokens=0, present=[True, True, False])
    p.allocated("r", H[:3], [1, 2, 3], external_tokens=2 * BS)
    ops = p.step([("r", 12, [1, 2, 3], H[:3])])
    assert ops[0].save == [] and ops[0].load == [(1, H[0]), (2, H[1])]


def test_pd_decode_waits_for_the_prefill_blocks_then_gives_up() -> None:
    p = BlockPlanner(BS, save=False, pd_wait_s=1.0)
    args = ("r", 13, H[:3])
    assert p.matched(*args, local_tokens=0, present=[True, False, False], expected_blocks=3, now=10.0) is None
    assert p.matched(*args, local_tokens=0, present=[True, True, False], expected_blocks=3, now=10.5) is None
    assert p.matched(*args, local_tokens=0, present=[True, True, True], expected_blocks=3, now=10.6) == 3 * BS
    q = BlockPlanner(BS, save=False, pd_wait_s=1.0)
    assert q.matched(*args, local_tokens=0, present=[True, False, False], expected_blocks=3, now=0.0) is None
    assert q.matched(*args, local_tokens=0, present=[True, False, False], expected_blocks=3, now=1.0) == BS


def test_sharded_lookup_counts_a_lost_shard_as_misses() -> None:
    class Down(MemoryStore):
        async def exists(self, keys: list[str]) -> list[bool]:
            raise TransferError("shard down")

    up, down = MemoryStore(), Down()
    store = ShardedStore([up, down], ["a", "b"])
    keys = [f"{i:04x}" for i in range(40)]
    asyncio.run(up.put([(k, b"x") for k in keys if store.shard_of(k) == 0]))
    got = asyncio.run(store.exists(keys))
    assert got == [store.shard_of(k) == 0 for k in keys] and any(got) and not all(got)
    assert store.shard_errors == 1
    with pytest.raises(TransferError):  # every shard down: the store is down (counted, backed off)
        asyncio.run(ShardedStore([Down(), Down()]).exists(keys))


def test_connector_module_imports_without_vllm() -> None:
    mod = importlib.import_module("kvpilot.kvtransfer.vllm_connector")
    try:
        importlib.import_module("vllm.distributed.kv_transfer.kv_connector.v1.base")
        have = True
    except ImportError:
        have = False
    assert mod.HAVE_VLLM is have and mod.STORE_TAG == "kvpilot-redis"
