"""The virtual-time cluster and its workloads."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from kvpilot.router.policies.least_loaded import LeastLoaded
from kvpilot.router.policy import InstanceLoad, Outcome, RequestView
from kvpilot.sim.cluster import Cluster, ClusterConfig
from kvpilot.sim.workload import SyntheticConfig, azure_conv, mooncake, synthetic


def test_mooncake_trace_keeps_prefix_structure() -> None:
    specs = mooncake(limit=200)
    assert len(specs) == 200 and specs[0].prompt_tokens == 6758
    assert all(len(s.segments) == -(-s.prompt_tokens // 512) for s in specs)
    # Every request starts with segment 0, so the first block hash is shared by all.
    firsts = {s.block_hashes(16)[0] for s in specs}
    assert len(firsts) == 1
    fast = mooncake(limit=200, speedup=4.0)
    assert fast[-1].arrival == specs[-1].arrival / 4


def test_azure_trace_has_no_shared_prefixes() -> None:
    specs = azure_conv(limit=300)
    seen: set[int] = set()
    for s in specs:
        assert not seen & set(s.segments)
        seen |= set(s.segments)
    assert specs == sorted(specs, key=lambda s: s.arrival)


def test_synthetic_is_seeded_and_multi_turn() -> None:
    cfg = SyntheticConfig(requests=300, seed=5)
    a, b = synthetic(cfg), synthetic(cfg)
    assert [(s.request_id, s.arrival, s.prompt_tokens) for s in a] == [(s.request_id, s.arrival, s.prompt_tokens)
                                                                       for s in b]
    turns = [s for s in a if s.request_id.endswith("-1")]
    assert turns, "some sessions have a second turn"
    first = next(s for s in a if s.request_id == turns[0].request_id[:-2] + "-0")
    assert turns[0].segments[: len(first.segments)] == first.segments  # the history is the prefix


def test_cluster_serves_every_request_and_reports() -> None:
    specs = synthetic(SyntheticConfig(requests=400, rate=20.0, seed=2))
    report = Cluster(ClusterConfig(instances=4, slo_ttft_s=2.0)).run(specs)
    assert sorted(r.request_id for r in report.results) == sorted(s.request_id for s in specs)
    by_id = {s.request_id: s for s in specs}
    for r in report.results:
        assert r.output_tokens == by_id[r.request_id].max_tokens
        assert 0 < r.ttft <= r.e2e
    # Round-robin spreads requests evenly.
    assert {s.requests for s in report.instances} == {100}
    s = report.summary
    assert 0.0 < s["slo_attainment"] <= 1.0 and s["ttft_p50_s"] <= s["ttft_p99_s"]
    assert report.to_json()["instances"][0]["mean_kv_usage"] > 0


def test_more_instances_lower_ttft_under_load() -> None:
    specs = mooncake(limit=600, speedup=8.0)
    small = Cluster(ClusterConfig(instances=2)).run(specs).summary
    large = Cluster(ClusterConfig(instances=8)).run(specs).summary
    assert large["ttft_p90_s"] < small["ttft_p90_s"]
    assert large["slo_attainment"] > small["slo_attainment"]


def test_several_router_replicas_serve_every_request_once_and_drain() -> None:
    """Three DualMap replicas, requests spread at random, each seeing the engines by polls; past
    capacity, so requests wait in every replica's queues and behind each other's at the engines."""
    specs = mooncake(limit=300, speedup=4.0)
    cluster = Cluster(ClusterConfig(instances=4, policy="dualmap", block_size=64, replicas=3, poll_s=0.25))
    report = cluster.run(specs)
    assert sorted(r.request_id for r in report.results) == sorted(s.request_id for s in specs)
    assert len(cluster.policies) == 3 and len({id(p) for p in cluster.policies}) == 3
    for view in cluster.views:   # each replica's own counts go back to zero
        assert all(load.in_flight == 0 and load.pending_prefill == 0 and load.pending_prefill_tokens == 0
                   for load in view)
    assert report.summary["cache_hit_rate"] > 0


def test_replicas_need_a_poll_interval() -> None:
    with pytest.raises(ValueError):
        Cluster(ClusterConfig(instances=2, replicas=2))


def test_every_dispatch_ends_in_one_on_complete_at_its_instance() -> None:
    """As in the proxy: a policy that never sees a first token (inside Ray Serve) learns of a
    prefill only from `on_complete`, so the cluster must call it once per request."""
    class Recording(LeastLoaded):
        def __init__(self) -> None:
            super().__init__()
            self.completed: list[tuple[str, Outcome]] = []

        def on_complete(self, request: RequestView, outcome: Outcome) -> None:
            self.completed.append((request.request_id, outcome))
            super().on_complete(request, outcome)

    policy = Recording()
    specs = synthetic(SyntheticConfig(requests=120, seed=3))
    report = Cluster(ClusterConfig(instances=3, seed=3), policy).run(specs)
    done = {rid: outcome for rid, outcome in policy.completed}
    assert len(policy.completed) == len(done) == len(specs)
    for result in report.results:
        assert done[result.request_id] == Outcome(f"sim-{result.instance}", "ok", prefilled=True)


def test_a_poll_observer_hears_each_poll_with_the_engines_waiting_counts() -> None:
    """The Ray Serve emulation (bench/ray_virtual.py) reads the polls as Serve's routing stats."""
    class Observing(LeastLoaded):
        def __init__(self) -> None:
            super().__init__()
            self.polls: list[tuple[float, list[int]]] = []

        def on_poll(self, instances: Sequence[InstanceLoad], t: float) -> None:
            self.polls.append((t, [inst.engine_waiting for inst in instances]))

    policy = Observing()
    specs = synthetic(SyntheticConfig(requests=200, seed=3, rate=40.0))
    Cluster(ClusterConfig(instances=2, seed=3, poll_s=0.5), policy).run(specs)
    times = [t for t, _ in policy.polls]
    assert len(times) > 4 and all(b - a == pytest.approx(0.5) for a, b in itertools.pairwise(times))
    assert any(sum(waiting) > 0 for _, waiting in policy.polls), "a loaded cluster never showed a waiting request"
    policy.polls.clear()
    Cluster(ClusterConfig(instances=2, seed=3), policy).run(specs)   # no poll interval: no polls
    assert policy.polls == []
