"""Planner inputs read from real simulator workers, directly and through real Prometheus."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kvpilot.autoscaler.planner import PlannerConfig, PoolPlanner, PoolSignals
from kvpilot.autoscaler.signals import PromSignals, ScrapeSignals
from kvpilot.procs import wait_for
from kvpilot.router.metrics import POOL_ROLE_LABEL
from kvpilot.testing.prometheus import PrometheusServer
from kvpilot.testing.router import RouterProcess
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


def test_requests_held_by_the_router_count_as_waiting(
        sim_worker_factory: Callable[..., SimWorker], router_factory: Callable[..., RouterProcess]) -> None:
    """End to end: DualMap's router-side queue hides an overload from the engines' own gauges
    (the worker's waiting queue stays empty); the autoscaler reads it from the router instead."""
    worker = sim_worker_factory("--profile", "h100-llama3-8b", "--time-scale", "0.25")   # ~1 s per 6k prefill
    router = router_factory([{"name": "sim-model", "policy": "dualmap", "ttftMs": 20000,
                              "endpoints": [{"name": "w0", "url": worker.url}]}])
    role = POOL_ROLE_LABEL["aggregated"]
    with_router, engines_only = ScrapeSignals(ttft_slo_s=2.0), ScrapeSignals(ttft_slo_s=2.0)

    def read() -> tuple[PoolSignals, PoolSignals]:
        now = time.monotonic()
        return (with_router.read([worker.url], now, 1, router_urls=(router.url,), router_role=role),
                engines_only.read([worker.url], now, 1))

    prompts = [block_text(700 + i, 6000) for i in range(10)]   # distinct: two exceed the release budget
    client = router.openai_client()
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        answers = [pool.submit(client.completions.create, model="sim-model", prompt=p, max_tokens=2) for p in prompts]
        wait_for(lambda: held(router) >= 4 and first_tokens(worker) >= 1, 60, "the router to hold the overload")
        s_router, s_engines = read()
        assert all(a.result().choices[0].text for a in answers), "every held request is served"
    # The router releases one 6k prompt at a time (its release budget): the engine's own queue holds
    # at most the one just released, waiting for the next step.
    assert s_engines.waiting is not None and s_engines.waiting <= 1
    assert s_router.waiting is not None and s_router.waiting - s_engines.waiting >= 4
    after = read()[0]
    assert after.waiting == 0, "served requests leave the count"


def held(router: RouterProcess) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in router.metrics_text().splitlines()
               if line.startswith("kvpilot_router_queue_depth{"))


def first_tokens(worker: SimWorker) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in worker.metrics_text().splitlines()
               if line.startswith("vllm:time_to_first_token_seconds_count"))
