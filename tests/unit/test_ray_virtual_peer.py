"""The virtual-time model of Ray Serve LLM's PrefixCacheAffinityRouter (bench/ray_virtual.py) keeps
its defaults' rule: the longest prefix match however loaded its holder is (no imbalance fallback),
the least queued of equal matches, the smallest tree under a 10% match, and a tree that never
forgets."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))   # bench/ is not a package

from ray_virtual import prefix_affinity_model

from kvpilot.router.policy import InstanceLoad, PolicyContext, RequestView


def _request(rid: str, blocks: list[int]) -> RequestView:
    return RequestView(rid, 16 * len(blocks), blocks)


def test_the_model_follows_the_longest_match_however_loaded_and_else_the_smallest_tree() -> None:
    policy = prefix_affinity_model(PolicyContext(kv_capacity_tokens=16 * 8))   # room for 8 blocks, ignored
    loads = [InstanceLoad("a"), InstanceLoad("b"), InstanceLoad("c")]
    session = list(range(100, 120))   # 20 blocks: more than the capacity the context claims

    def send(request: RequestView) -> str:
        index = policy.route(request, loads).index
        policy.on_dispatch(request, index, loads)
        loads[index].in_flight += 1
        return loads[index].name

    first = send(_request("r0", session))
    loads[[inst.name for inst in loads].index(first)].in_flight = 50   # its holder is now far the busiest
    assert send(_request("r1", [*session, 1, 2])) == first             # ... and still gets the next turn
    # 40 blocks more there, five times the capacity claimed: the tree forgets none of the session.
    policy.on_dispatch(_request("filler", list(range(1000, 1040))), [i.name for i in loads].index(first), loads)
    assert send(_request("r1b", [*session, 1, 2, 3])) == first
    # Under 10% matched (1 of 11 blocks): the smallest tree, not the holder of that block.
    cold = send(_request("r2", [100, *range(200, 210)]))
    assert cold != first
    # Equal matches: the least queued of them.
    loads[[inst.name for inst in loads].index(cold)].in_flight = 0
    other = send(_request("r3", [300, 301]))
    assert other not in (first, cold)
    shared = [*range(400, 404)]
    for name in (cold, other):
        policy.on_dispatch(_request(f"seed-{name}", shared), [i.name for i in loads].index(name), loads)
    loads[[inst.name for inst in loads].index(other)].in_flight = 5
    assert send(_request("r4", [*shared, 9])) == cold
