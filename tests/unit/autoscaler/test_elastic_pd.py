"""The disaggregated elastic world: both pools sized by their own planners, each pool's GPU time
kept apart, and every request served through prefill → KV transfer → decode."""

from __future__ import annotations

import random

from kvpilot.autoscaler.baselines import Fixed
from kvpilot.autoscaler.planner import PlannerConfig, PoolPlanner
from kvpilot.sim.elastic import ElasticConfig
from kvpilot.sim.elastic_pd import ElasticPDCluster
from kvpilot.sim.workload import RequestSpec


def phases(seed: int = 0) -> list[RequestSpec]:
    """40 s of long prompts with short answers (12/s), then 40 s of short prompts with long answers (30/s)."""
    rng, out, t, seg = random.Random(seed), [], 0.0, 1 << 50
    while t < 80:
        t += rng.expovariate(12.0 if t < 40 else 30.0)
        prompt, answer = (rng.randint(3000, 6000), 8) if t < 40 else (rng.randint(100, 300), 800)
        n = -(-prompt // 512)
        out.append(RequestSpec(f"r{len(out)}", t, prompt, answer, list(range(seg, seg + n))))
        seg += n
    return out


CFG = ElasticConfig(initial_replicas=1, interval_s=5.0, cold_start_s=10.0, slo_tpot_s=0.025)


def test_every_request_crosses_both_pools_and_gpu_time_is_kept_per_pool() -> None:
    specs = phases()
    report = ElasticPDCluster(CFG, {"prefill": Fixed(2), "decode": Fixed(1)}).run_pd(specs, {"prefill": 2,
                                                                                           "decode": 1})
    assert len(report.served) == len(specs)
    assert all(s.prefill_ttft is not None and 0 < s.prefill_ttft <= s.ttft for s in report.served)
    per = report.pool_gpu_seconds or {}
    assert abs(per["prefill"] - 2 * report.span_s) < 1e-6 and abs(per["decode"] - report.span_s) < 1e-6
    s = report.summary
    assert s["missed_ttft_at_prefill"] + s["missed_ttft_after_prefill"] + s["missed_tpot"] == \
        sum(1 for r in report.served if not r.ok)


def test_each_pool_follows_its_own_demand() -> None:
    """Long prompts load the prefill pool, long answers the decode pool: with one replica each to
    start, the prefill planner grows its pool in the first phase, and the decode one in the second
    (a 25 ms TPOT SLO, so that a few hundred sequences need more than one decode replica)."""
    cfg = PlannerConfig(ttft_slo_s=2.0, tpot_slo_s=0.025, max_replicas=8, scale_down_window_s=20,
                        prefill_tps_prior=20_000, decode_seqs_prior=64)
    planners = {"prefill": PoolPlanner("prefill", cfg), "decode": PoolPlanner("decode", cfg)}
    report = ElasticPDCluster(CFG, planners).run_pd(phases(), {"prefill": 1, "decode": 1})
    pools = report.pool_decisions or {}
    first = max(d.desired for d in pools["prefill"] if d.time < 40)
    assert first >= 2, pools["prefill"]
    later_decode = max(d.desired for d in pools["decode"] if d.time >= 40)
    early_decode = max(d.desired for d in pools["decode"] if d.time < 40)
    assert later_decode > early_decode, pools["decode"]
