"""Cache-preserving scale-in and pre-warmed scale-out: the plan sends each hot prefix to the
pods that newly own it, and a handover through the store makes the successor hit its cache."""

from __future__ import annotations

import asyncio
import os

from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.scaling import HotPrefix, Manifest, PrefixHandover
from kvpilot.kvtransfer.store import MemoryStore, TransferError
from kvpilot.router.hashring import dual_ring_owners
from kvpilot.router.hot_prefixes import plan_scale_in, plan_scale_out
from kvpilot.sim.engine import Engine
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.sequence import Sequence
from kvpilot.tokens import block_hashes, block_text

OWNERS = dual_ring_owners(vnodes=64)
PODS = frozenset(f"pod-{i}" for i in range(5))
HOT = [HotPrefix(key=(i * 0x9E3779B97F4A7C15) & (2**64 - 1), block_hashes=(i, i + 1000), hits=i % 7)
       for i in range(300)]


def test_scale_in_sends_every_hot_prefix_of_the_leaving_pod_to_its_new_owners_only() -> None:
    plan = plan_scale_in(HOT, "pod-2", PODS, OWNERS)
    after = PODS - {"pod-2"}
    assert "pod-2" not in plan
    for pod, prefixes in plan.items():
        for p in prefixes:
            assert "pod-2" in OWNERS(p.key, PODS) and pod in OWNERS(p.key, after) and pod not in OWNERS(p.key, PODS)
        assert [p.hits for p in prefixes] == sorted((p.hits for p in prefixes), reverse=True)  # hottest first
    owned = {p.key for p in HOT if "pod-2" in OWNERS(p.key, PODS)}
    assert owned and owned == {p.key for ps in plan.values() for p in ps}  # none left behind
    untouched = {p.key for p in HOT} - owned
    assert all(OWNERS(k, PODS) == OWNERS(k, after) for k in untouched)  # others keep their owners


def test_scale_out_prewarms_exactly_what_the_new_pod_takes_over() -> None:
    plan = plan_scale_out(HOT, "pod-9", PODS, OWNERS)
    gained = {p.key for p in HOT if "pod-9" in OWNERS(p.key, PODS | {"pod-9"})}
    assert gained and gained == {p.key for ps in plan.values() for p in ps}
    assert all(src in OWNERS(p.key, PODS) for src, ps in plan.items() for p in ps)  # a current owner exports


def test_handover_through_the_store_turns_the_successors_misses_into_hits() -> None:
    profile = get_profile("h100-qwen2.5-0.5b")
    leaving, successor = Engine(profile), Engine(profile)
    prompt = block_text(9, 640)
    hashes = block_hashes(prompt, 16)
    leaving.add(Sequence("warm", 0.0, 640, hashes, 1))
    while leaving.has_work:
        plan = leaving.schedule()
        assert plan is not None
        leaving.commit(plan, 0.0)
    assert leaving.cached_prefix(hashes) == hashes and successor.cached_prefix(hashes) == []

    def read_block(h: int) -> bytes | None:
        return os.urandom(16 * profile.kv_bytes_per_token) if h in leaving.pool.cached else None

    async def move() -> dict[int, bytes]:
        agent = KVAgent("handover", MemoryStore())
        handover = PrefixHandover(agent)
        manifest = await handover.export([HotPrefix(hashes[-1], tuple(hashes), 5)], read_block)
        assert manifest.bytes == len(hashes) * 16 * profile.kv_bytes_per_token
        return await handover.import_(manifest)

    got = asyncio.run(move())
    assert list(got) == hashes
    assert successor.warm(list(got)) == len(hashes) and successor.warm(list(got)) == 0
    seq = Sequence("after", 0.0, 640, hashes, 1)
    successor.add(seq)
    plan = successor.schedule()
    assert plan is not None and seq.cached_tokens == 624  # all but the last block: vLLM recomputes one token


class _DeadStore(MemoryStore):
    async def get(self, keys: list[str]) -> list[bytes | None]:
        raise TransferError("redis is down")


def test_a_failed_handover_means_recompute_not_an_error() -> None:
    async def run() -> dict[int, bytes]:
        handover = PrefixHandover(KVAgent("x", _DeadStore()))
        manifest = await handover.export([HotPrefix(1, (1, 2), 1)], lambda h: b"kv")
        return await handover.import_(manifest)

    assert asyncio.run(run()) == {}
    assert asyncio.run(PrefixHandover(KVAgent("y", MemoryStore())).import_(Manifest())) == {}
