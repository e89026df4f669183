"""Planner inputs read from real simulator workers, directly and through real Prometheus."""

from __future__ import annotations

import time
from collections.abc import Callable

from kvpilot.autoscaler.planner import PlannerConfig, PoolPlanner
from kvpilot.autoscaler.signals import PromSignals, ScrapeSignals
from kvpilot.procs import wait_for
from kvpilot.testing.prometheus import PrometheusServer
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text


def load(workers: list[SimWorker], n: int) -> None:
    for i in range(n):
        w = workers[i % len(workers)]
        w.openai_client().completions.create(model="sim-model", prompt=block_text(1000 + i, 512), max_tokens=8)


def test_scrape_signals_take_deltas_and_gaps_hold_the_size(sim_worker_factory: Callable[..., SimWorker]) -> None:
    workers = [sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5") for _ in range(2)]
    urls = [w.url for w in workers]
    signals = ScrapeSignals(ttft_slo_s=10.0)
    first = signals.read(urls, time.monotonic(), current=2)
    assert first.ready == 2 and first.uncached_prompt_tps is None  # no delta yet: unknown, not zero
    load(workers, 10)
    second = signals.read(urls, time.monotonic(), current=2)
    assert second.uncached_prompt_tps is not None and second.uncached_prompt_tps > 0
    assert second.ttft_p90_s is not None and second.ttft_p90_s > 0 and second.attainment == 1.0
    workers[1].stop()
    gap = signals.read(urls, time.monotonic(), current=2)
    assert gap.ready == 1 and gap.uncached_prompt_tps is None and gap.running_seqs is None
    plan = PoolPlanner("aggregated", PlannerConfig()).plan(gap)
    assert plan.desired == 2 and "hold" in plan.reason


def test_prometheus_signals_match_the_workers(sim_worker_factory: Callable[..., SimWorker],
                                              prometheus_factory: Callable[..., PrometheusServer]) -> None:
    workers = [sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5") for _ in range(2)]
    prom = prometheus_factory([f"127.0.0.1:{w.port}" for w in workers])
    signals = PromSignals(prom.url, 'job="kvpilot"', ttft_slo_s=10.0, window="30s")
    wait_for(lambda: len(prom.query('up{job="kvpilot"} == 1')) == 2, 30, "both workers scraped", prom.proc)
    empty = PromSignals(prom.url, 'job="nobody"', ttft_slo_s=10.0).read(0.0, 2, 2)
    assert empty.uncached_prompt_tps is None and empty.running_seqs is None  # no series: unknown
    load(workers, 10)

    def fresh() -> bool:
        s = signals.read(time.monotonic(), 2, 2)
        return bool(s.uncached_prompt_tps) and s.ttft_p90_s is not None and s.attainment == 1.0

    wait_for(fresh, 30, "Prometheus to see the load")
    s = signals.read(time.monotonic(), 2, 2)
    assert s.running_seqs == 0 and s.kv_usage is not None and s.waiting == 0
