"""Cache-preserving scale-in between real simulator processes through real Redis: the leaving
pod's hot prefix lands in the cache of the pod that inherits its ring key."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

from kvpilot.kvtransfer.scaling import HotPrefix
from kvpilot.router.hashring import dual_ring_owners
from kvpilot.router.hot_prefixes import plan_scale_in
from kvpilot.testing.redis import RedisServer
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_hashes, block_text

Workers = Callable[..., SimWorker]


def _post(worker: SimWorker, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(worker.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def _cached_tokens(worker: SimWorker, prompt: str) -> int:
    out = worker.openai_client().completions.create(model="sim-model", prompt=prompt, max_tokens=2)
    assert out.usage is not None and out.usage.prompt_tokens_details is not None
    return int(out.usage.prompt_tokens_details.cached_tokens or 0)


def test_scale_in_hands_the_leaving_pods_hot_prefix_to_its_successor(redis_server: RedisServer,
                                                                     sim_worker_factory: Workers) -> None:
    flags = ("--profile", "h100-qwen2.5-0.5b", "--kv-store", redis_server.url)
    pods = {name: sim_worker_factory(*flags) for name in ("pod-a", "pod-b", "pod-c")}
    members, owners = frozenset(pods), dual_ring_owners()
    # A hot prompt whose affinity key pod-a owns (the router keys on the prompt's leading blocks).
    prompt, hashes = next((p, block_hashes(p, 16)) for p in (block_text(seed, 1024) for seed in range(100))
                          if "pod-a" in owners(block_hashes(p, 16)[-1], members))
    hot = HotPrefix(hashes[-1], tuple(hashes), hits=50)
    assert _cached_tokens(pods["pod-a"], prompt) == 0 and _cached_tokens(pods["pod-a"], prompt) == 1008

    plan = plan_scale_in([hot], "pod-a", members, owners)
    (successor, prefixes), = plan.items()
    assert prefixes == [hot]
    exported = _post(pods["pod-a"], "/kvpilot/prefixes/export",
                     {"prefixes": [{"key": hot.key, "block_hashes": list(hot.block_hashes), "hits": hot.hits}]})
    assert exported["bytes"] == 64 * 16 * 12 * 1024  # 64 blocks of 16 tokens, 12 KiB per token
    pods["pod-a"].stop()  # the pod is gone; its KV lives on in the store
    imported = _post(pods[successor], "/kvpilot/prefixes/import", {"manifest": exported["manifest"]})
    assert imported == {"blocks_added": 64, "blocks_received": 64}
    assert _cached_tokens(pods[successor], prompt) == 1008  # a hit on the first request after scale-in
    other = next(name for name in pods if name not in ("pod-a", successor))
    assert _cached_tokens(pods[other], prompt) == 0  # only the inheriting pod was warmed
