"""kvpilot's DualMap as Ray Serve's request router, on a local Ray cluster (2 CPUs, loopback).

The simulator app (`kvpilot.ray.app`) runs twice side by side, same replicas and engines: once with
kvpilot's router on the engine deployment, once with Serve's default (power of two choices). The
official `openai` client streams completions through Serve's HTTP proxy; where each request ran,
and what that replica's prefix cache did, come from the replicas' own counters in each response.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from ray import serve

from kvpilot.procs import free_port
from kvpilot.ray.app import build_app
from kvpilot.ray.local import LocalRay

pytestmark = pytest.mark.timeout(600)   # Ray and 8 replica processes start in ~45 s on a quiet 2-core box, 3 min loaded
REPLICAS = 3
PREFIXES = [f"tenant {p} system prompt. " + "You answer questions about cache-aware routing. " * 24
            for p in range(10)]   # 10 prefixes: all on one of 3 replicas by chance has p = 5e-5
ROUNDS = 3


@pytest.fixture(scope="module")
def serve_port() -> Iterator[int]:
    local = LocalRay(num_cpus=2)
    port = free_port()
    left: list[int] = []
    try:
        local.start(http_port=port)
        serve.run_many([   # both apps start together (replica start-up dominates this test's time)
            serve.RunTarget(build_app(replicas=REPLICAS, router="dualmap"), name="kvpilot", route_prefix="/kvpilot"),
            serve.RunTarget(build_app(replicas=REPLICAS, router=None), name="default", route_prefix="/default")])
        yield port
    finally:
        left = local.stop()   # kills whatever of this Ray outlived the shutdown
    assert not left, f"Ray processes survived ray.shutdown(): {left}"


def _replay(port: int, app: str) -> tuple[dict[int, set[str]], float]:
    """Each prefix's requests in turn (one at a time): which replicas served each prefix, and the
    prefix-cache hit rate the replicas themselves counted."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/{app}/v1", api_key="none", max_retries=0, timeout=60)
    served: dict[int, set[str]] = {}
    counters: dict[str, dict[str, int]] = {}
    for r in range(ROUNDS):
        for p, prefix in enumerate(PREFIXES):
            text, last = "", None
            for chunk in client.completions.create(model="sim-model", prompt=prefix + f"Question {r}: why?",
                                                   max_tokens=4, stream=True):
                text += "".join(c.text for c in chunk.choices)
                last = chunk
            assert last is not None and text.strip(), "an empty stream"
            mine = (last.model_extra or {})["kvpilot"]
            served.setdefault(p, set()).add(mine["replica"])
            counters[mine["replica"]] = mine    # counters only grow: the latest is the replica's total
    hits = sum(c["prefix_cache_hits"] for c in counters.values())
    queries = sum(c["prefix_cache_queries"] for c in counters.values())
    return served, hits / queries


def test_prefix_sharing_requests_stay_on_one_replica_with_kvpilot_and_spread_without(serve_port: int) -> None:
    ours, our_hit_rate = _replay(serve_port, "kvpilot")
    assert all(len(replicas) == 1 for replicas in ours.values()), ours
    assert len(set().union(*ours.values())) > 1, "every prefix on one replica: nothing was balanced"
    theirs, their_hit_rate = _replay(serve_port, "default")
    assert any(len(replicas) > 1 for replicas in theirs.values()), theirs
    assert our_hit_rate > their_hit_rate, (our_hit_rate, their_hit_rate)
