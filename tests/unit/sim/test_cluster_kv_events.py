"""Router replicas that follow the engines' KV events in the virtual-time cluster."""

from __future__ import annotations

import pytest

from kvpilot.router.policy import RequestView
from kvpilot.sim.cluster import Cluster, ClusterConfig, EngineCaches
from kvpilot.sim.families import make_workload


def test_a_policy_without_a_cache_estimate_cannot_follow_kv_events() -> None:
    with pytest.raises(ValueError, match="no cache estimate"):
        Cluster(ClusterConfig(instances=2, policy="round-robin", kv_events=True))


def _beliefs(kv_events: bool) -> list[set[int]]:
    """For the last requests of a run: the prefill work each replica expects at the instance that
    served it (one value per request when the replicas agree)."""
    cfg = ClusterConfig(instances=4, policy="dualmap", block_size=64, replicas=3, poll_s=0.25, kv_events=kv_events)
    cluster = Cluster(cfg)
    specs = make_workload("agentic", 300, 20.0, 0)
    by_id = {s.request_id: s for s in specs}
    out = []
    for result in cluster.run(specs).results[-60:]:
        spec = by_id[result.request_id]
        view = RequestView(spec.request_id, spec.prompt_tokens, spec.block_hashes(64), spec.arrival)
        name = f"sim-{result.instance}"
        estimates = [policy.cache_estimate() for policy in cluster.policies]
        out.append({e.uncached(name, view) for e in estimates if e is not None})
        if kv_events:   # and that shared belief is the engine's own cache
            truth = len(cluster.engines[result.instance].cached_prefix(view.block_hashes)) * 64
            assert EngineCaches(cluster.engines, 64).cached_tokens(name, view) == truth
    return out


def test_every_replica_reads_what_the_engines_cache() -> None:
    assert all(len(values) == 1 for values in _beliefs(kv_events=True))
    # without the events each replica knows only what it sent: they disagree on some prompts
    assert any(len(values) > 1 for values in _beliefs(kv_events=False))


def test_following_kv_events_raises_the_replicas_hit_rate() -> None:
    """Three replicas each see a third of the dispatches; the engines' caches show them all."""
    specs = make_workload("mooncake", 600, 5.0, 0)

    def hit(kv_events: bool) -> float:
        cfg = ClusterConfig(instances=8, policy="dualmap", block_size=64, replicas=3, poll_s=0.25, seed=0,
                            kv_events=kv_events)
        return float(Cluster(cfg).run(specs).summary["cache_hit_rate"])

    assert hit(True) > hit(False)
