"""The virtual-time rebalancer: moves happen under a hot spot, and every request still ends
once, with all its tokens, and no KV block leaks on either side of a move."""

from __future__ import annotations

import pytest

from kvpilot.sim.cluster import Cluster, ClusterConfig
from kvpilot.sim.migration_cluster import Mode, RebalanceConfig, Rebalancer
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.workload import SyntheticConfig, synthetic

PROFILE = get_profile("h100-llama3-8b")
SPECS = synthetic(SyntheticConfig(requests=300, rate=25, tenants=6, tenant_skew=2.0, system_prompt_segments=(8, 12),
                                  output_tokens=(64, 400), seed=3))


def run(mode: Mode) -> tuple[Cluster, Rebalancer, dict[str, int]]:
    cluster = Cluster(ClusterConfig(instances=4, policy="affinity", slo_ttft_s=2.0, slo_tpot_s=0.05))
    reb = Rebalancer(RebalanceConfig(mode=mode, slo_tpot_s=0.05, slo_ttft_s=2.0), PROFILE.kv_bytes_per_token,
                     PROFILE.prefill_token_s)
    cluster.rebalancer = reb
    report = cluster.run(SPECS)
    return cluster, reb, {r.request_id: r.output_tokens for r in report.results}


@pytest.mark.parametrize("mode", ["queued", "live"])
def test_moves_happen_and_every_request_completes_with_all_its_tokens(mode: Mode) -> None:
    cluster, reb, outputs = run(mode)
    assert outputs == {s.request_id: s.max_tokens for s in SPECS}
    moves = reb.stats.live_moves if mode == "live" else reb.stats.queued_moves
    assert moves > 0
    if mode == "live":
        assert reb.stats.bytes_copied > 0 and reb.stats.queued_moves == 0
    assert all(e.pool.num_used == 0 and not e.has_work for e in cluster.engines)  # nothing leaked
    assert all(load.in_flight == 0 and load.pending_prefill_tokens == 0 for load in cluster.loads)


def test_off_means_no_moves_and_runs_are_deterministic() -> None:
    _, reb, outputs = run("none")
    assert reb.stats.live_moves == reb.stats.queued_moves == 0 and len(outputs) == len(SPECS)
    a, b = run("live")[1].stats, run("live")[1].stats
    assert (a.live_moves, a.bytes_copied) == (b.live_moves, b.bytes_copied)
