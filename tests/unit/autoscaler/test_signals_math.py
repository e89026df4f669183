"""Percentiles and SLO shares from histogram bucket deltas."""

from __future__ import annotations

import math

from kvpilot.autoscaler.signals import quantile_from_buckets, share_within


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = {0.1: 10.0, 0.5: 50.0, 1.0: 90.0, math.inf: 100.0}
    assert quantile_from_buckets(buckets, 0.5) == 0.5
    assert abs((quantile_from_buckets(buckets, 0.7) or 0) - 0.75) < 1e-9  # halfway through (0.5, 1.0]
    assert quantile_from_buckets(buckets, 0.95) == 1.0  # the +Inf bucket answers its lower bound
    assert quantile_from_buckets({}, 0.9) is None and quantile_from_buckets({1.0: 0.0}, 0.9) is None


def test_share_within_uses_the_bucket_at_or_below_the_limit() -> None:
    buckets = {0.5: 40.0, 1.0: 80.0, 2.5: 95.0, math.inf: 100.0}
    assert share_within(buckets, 2.0) == 0.8
    assert share_within(buckets, 2.5) == 0.95
    assert share_within(buckets, 0.1) == 0.0
    assert share_within({}, 1.0) is None


def test_requests_the_router_holds_for_a_pool_count_as_waiting() -> None:
    from prometheus_client import generate_latest

    from kvpilot.autoscaler.signals import held_by_router
    from kvpilot.router.metrics import RouterMetrics

    metrics = RouterMetrics()
    metrics.queue_depth.labels("llama", "prefill", "pod-a").set(3)
    metrics.queue_depth.labels("llama", "prefill", "pod-b").set(4)
    metrics.queue_depth.labels("llama", "decode", "pod-c").set(9)
    text = generate_latest(metrics.registry).decode()
    assert held_by_router(text, "prefill") == 7 and held_by_router(text, "decode") == 9
    assert held_by_router(text, "both") == 0        # another pool's
    assert held_by_router(None, "prefill") == 0     # a router that did not answer


def test_the_autoscaler_reads_the_queue_depth_label_the_router_exports_for_each_pool() -> None:
    import asyncio

    from kvpilot.router.admin import Admin
    from kvpilot.router.config import RouterConfig
    from kvpilot.router.metrics import POOL_ROLE_LABEL, QUEUE_DEPTH
    from kvpilot.router.runtime import Runtime

    def exported_roles(model: dict[str, object]) -> set[str]:
        admin = Admin(Runtime(RouterConfig.model_validate({"models": [model]})))
        body = asyncio.run(admin.metrics(None)).body
        text = body.decode() if isinstance(body, bytes) else ""
        return {line.split('role="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith(QUEUE_DEPTH + "{")}

    eps = [{"name": "w0", "url": "http://127.0.0.1:9", "role": "both"}]
    assert exported_roles({"name": "m", "policy": "dualmap", "endpoints": eps}) == {POOL_ROLE_LABEL["aggregated"]}
    pd = [{"name": "p0", "url": "http://127.0.0.1:9", "role": "prefill"},
          {"name": "d0", "url": "http://127.0.0.1:10", "role": "decode"}]
    # P/D: DualMap picks prefill (its queues); decode is balanced by load, without queues.
    assert exported_roles({"name": "m", "policy": "dualmap", "mode": "disaggregated",
                           "endpoints": pd}) == {POOL_ROLE_LABEL["prefill"]}


def test_scraped_signals_carry_the_mean_ttft_from_the_histogram_sum() -> None:
    """The mean TTFT (what the planner's raw prefill bound needs: median TTFT is not a bound on a
    mix) is the interval's delta of the histogram's sum over the delta of its count."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from kvpilot import vllm_metrics as m
    from kvpilot.autoscaler.signals import ScrapeSignals

    registry = CollectorRegistry()
    ttft = Histogram(m.TTFT, "ttft", registry=registry, buckets=m.LATENCY_BUCKETS)
    ttft.observe(5.0)                                  # before the first scrape: not this interval's

    class Reader(ScrapeSignals):
        def _get(self, url: str) -> str | None:
            return generate_latest(registry).decode()

    reader = Reader(ttft_slo_s=2.0)
    assert reader.read(["http://w0"], 0.0, 1).ttft_mean_s is None      # no delta yet
    for x in (0.02, 0.02, 0.02, 0.5):                  # three short prompts, one long
        ttft.observe(x)
    s = reader.read(["http://w0"], 10.0, 1)
    assert s.ttft_mean_s is not None and math.isclose(s.ttft_mean_s, 0.14)
    assert s.ttft_p50_s is not None and s.ttft_p50_s < 0.05 < s.ttft_mean_s
