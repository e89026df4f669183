"""bench/ray_virtual.py under drawn replica ids: the policy sees Serve-like names, the cluster its
own, and every dispatch and completion crosses the mapping (else the adapter's bookkeeping, and
a ring policy's placement, would be off)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))   # bench/ is not a package

from ray_virtual import ServeQueued, replica_ids

from kvpilot.router.policies.dualmap import DualMap
from kvpilot.sim.cluster import Cluster, ClusterConfig, policy_context
from kvpilot.sim.families import make_workload


def test_draws_are_fixed_per_draw_and_distinct() -> None:
    first, again, other = replica_ids(4, 0), replica_ids(4, 0), replica_ids(4, 1)
    assert first == again and first != other
    assert sorted(first) == [f"sim-{i}" for i in range(4)]
    assert len(set(first.values())) == 4 and all(len(name) == 8 for name in first.values())


def test_a_run_under_drawn_ids_routes_by_them_and_completes_every_dispatch() -> None:
    config = ClusterConfig(instances=4, seed=3, slo_ttft_s=2.0, poll_s=0.5)
    ids = replica_ids(4, 2)
    policy = DualMap(policy_context(config))
    driven = ServeQueued(policy, ids)
    specs = make_workload("agentic", 120, 20.0, 3)
    report = Cluster(config, driven).run(specs)
    assert len(report.results) == len(specs)
    assert [inst.name for inst in driven.adapter.loads] == sorted(ids.values())
    assert driven.adapter.in_flight() == 0                      # every routed request completed by its id
    caches = policy.estimate.caches
    used = [i for i, stats in enumerate(report.instances) if stats.requests]
    assert len(used) > 1
    for i in used:                                              # each dispatch reached the policy by its id
        assert len(caches[ids[f"sim-{i}"]]) > 0
