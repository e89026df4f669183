"""The elastic virtual-time cluster: replicas start cold, drain before they stop, every request is
served exactly once, and GPU time is paid from the moment a replica is asked for."""

from __future__ import annotations

import dataclasses

from kvpilot.autoscaler.planner import Plan, PoolSignals
from kvpilot.sim.elastic import ElasticCluster, ElasticConfig
from kvpilot.sim.workload import RequestSpec, with_bursts


def steady(n: int, rate: float, prompt: int = 512, out: int = 64) -> list[RequestSpec]:
    return [RequestSpec(f"r{i}", i / rate, prompt, out, [1 << 40 | i]) for i in range(n)]


class Script:
    """Asks for `sizes[k]` at the k-th interval, and records what it was shown."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.seen: list[PoolSignals] = []

    def plan(self, s: PoolSignals) -> Plan:
        self.seen.append(s)
        k = min(len(self.seen), len(self.sizes)) - 1
        return Plan(self.sizes[k], "scripted")


def test_cold_start_drain_and_gpu_time() -> None:
    cfg = ElasticConfig(profile="h100-qwen2.5-0.5b", initial_replicas=1, interval_s=10, cold_start_s=30)
    script = Script([3, 3, 3, 3, 3, 3, 1])
    cluster = ElasticCluster(cfg, script)
    report = cluster.run(steady(600, 5.0))                     # 120 s of traffic
    assert len(report.served) == 600                           # every request, once
    assert len({(r.arrival, r.ttft) for r in report.served}) == 600
    # Asked at t=10, the two new replicas serve from t=40: the planner sees them starting first.
    assert [s.ready for s in script.seen[1:4]] == [1, 1, 3]
    assert [s.current for s in script.seen[1:4]] == [3, 3, 3]
    names = [r.name for r in cluster.replicas]
    assert len(names) == 3
    # Scale-in at t=70 drains two replicas; the survivor runs to the end.
    stopped = sorted(r.stopped_at or 0.0 for r in cluster.replicas)
    assert 70.0 <= stopped[0] <= stopped[1] < stopped[2]
    expected = sum((r.stopped_at or 0.0) - r.asked_at for r in cluster.replicas)
    assert abs(report.gpu_seconds - expected) < 1e-9
    assert report.gpu_seconds > 2 * 30                         # the cold starts are paid for


def test_signals_report_demand_and_missing_latency_as_none() -> None:
    script = Script([1] * 100)
    quiet_then_back = [dataclasses.replace(s, request_id=f"late{i}", arrival=100.0 + s.arrival)
                       for i, s in enumerate(steady(50, 5.0, 1024))]
    ElasticCluster(ElasticConfig(profile="h100-qwen2.5-0.5b", interval_s=10), script).run(
        steady(200, 5.0, 1024) + quiet_then_back)
    busy = [s for s in script.seen if s.time <= 40]
    assert all(s.uncached_prompt_tps and 4000 < s.uncached_prompt_tps < 6500 for s in busy)  # 5 req/s × 1024
    assert all(s.ttft_p90_s is not None and s.attainment == 1.0 for s in busy)
    # Traffic ends at 40 s: an interval that finished no request has no latency to report, and says
    # so with None rather than a 0 the planner would read as "fast".
    idle = [s for s in script.seen if 60 <= s.time <= 90]
    assert idle and all(s.ttft_p90_s is None and s.attainment is None for s in idle)


def test_bursts_add_copies_of_the_windows_own_requests() -> None:
    base = steady(1000, 10.0)                                   # 100 s at 10 req/s
    out = with_bursts(base, [(20.0, 40.0, 3.0, 0.0)], seed=1)
    inside = [s for s in out if 20.0 <= s.arrival <= 60.0]
    assert len(out) == 1000 + 2 * 400                           # the window's 400 requests, twice more
    assert len(inside) == 3 * 400 + 1                           # 3× inside (plus the one at t=60)
    assert len({s.request_id for s in out}) == len(out)
    ramped = with_bursts(base, [(20.0, 40.0, 3.0, 20.0)], seed=1)
    assert len(base) < len(ramped) < len(out)                   # ramps add less than a step
