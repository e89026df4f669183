"""Where the planner's inputs come from: scraping workers' /metrics, or PromQL over Prometheus.

Both read vLLM's metric names and turn them into one `PoolSignals` per interval. Rates and
percentiles come from counter and histogram *deltas* over the interval, never from lifetime
totals. Anything that cannot be read — a worker that does not answer, a query that returns no
series — is None, so the planner holds the size instead of mistaking silence for zero load.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from kvpilot import vllm_metrics as m
from kvpilot.autoscaler.planner import PoolSignals
from kvpilot.names import COLD_HELD, QUEUE_DEPTH


def quantile_from_buckets(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a histogram given cumulative bucket counts by upper bound (Prometheus'
    histogram_quantile, with linear interpolation inside the bucket)."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return prev_bound
            width = count - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / width if width else 1.0)
        prev_bound, prev_count = b, count
    return prev_bound


def share_within(buckets: dict[float, float], limit: float) -> float | None:
    """Share of observations ≤ limit, from the largest bucket bound not above it."""
    if not buckets or buckets[max(buckets)] <= 0:
        return None
    below = [b for b in buckets if b <= limit]
    return (buckets[max(below)] if below else 0.0) / buckets[max(buckets)]


@dataclass
class _Sample:
    time: float
    counters: dict[str, float]
    ttft: dict[float, float]
    itl: dict[float, float]


def parse_engine_metrics(text: str) -> tuple[dict[str, float], dict[str, float], dict[float, float],
                                             dict[float, float]]:
    """One worker's /metrics: gauges summed over its engines, prompt-token counters by source, and
    the TTFT and inter-token latency histograms' cumulative buckets."""
    gauges: dict[str, float] = defaultdict(float)
    counters: dict[str, float] = defaultdict(float)
    ttft: dict[float, float] = defaultdict(float)
    itl: dict[float, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (m.RUNNING, m.WAITING, m.KV_USAGE):
                gauges[s.name] += s.value
            elif s.name == m.PROMPT_TOKENS_BY_SOURCE + "_total" and s.labels.get("source") == "local_compute":
                counters["uncached_prompt_tokens"] += s.value
            elif s.name == m.PROMPT_TOKENS_BY_SOURCE + "_total" and s.labels.get("source") == "local_cache_hit":
                counters["cached_prompt_tokens"] += s.value
            elif s.name == m.TTFT + "_sum":
                counters["ttft_sum"] += s.value
            elif s.name == m.TTFT + "_bucket":
                ttft[float(s.labels["le"])] += s.value
            elif s.name == m.ITL + "_bucket":
                itl[float(s.labels["le"])] += s.value
    return gauges, counters, ttft, itl


def held_by_router(text: str | None, role: str, name: str = QUEUE_DEPTH) -> float:
    """The router's gauge `name` for one pool role, summed over models and endpoints."""
    if not text:
        return 0.0
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and s.labels.get("role") == role)


def scrape_text(url: str, timeout_s: float) -> str | None:
    """`url`/metrics, or None when it does not answer."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
            text: str = resp.read().decode()
            return text
    except OSError:
        return None


def cold_held(router_urls: tuple[str, ...], role: str, timeout_s: float = 2.0) -> float:
    """Requests the service's routers hold for this pool role while it is at zero replicas
    (`kvpilot.router.wake`): what wakes a pool; a router that does not answer adds nothing."""
    return sum(held_by_router(scrape_text(u, timeout_s), role, COLD_HELD) for u in router_urls)


class ScrapeSignals:
    """Scrapes each worker of a pool directly; keeps the previous scrape to take deltas."""

    def __init__(self, ttft_slo_s: float, timeout_s: float = 2.0) -> None:
        self.ttft_slo_s = ttft_slo_s
        self.timeout_s = timeout_s
        self._last: _Sample | None = None

    def _get(self, url: str) -> str | None:
        return scrape_text(url, self.timeout_s)

    def read(self, urls: list[str], now: float, current: int, router_urls: tuple[str, ...] = (),
             router_role: str = "") -> PoolSignals:
        """`router_urls`: the service's routers. Requests they hold back for this pool (their
        `kvpilot_router_queue_depth{role=router_role}`) wait as surely as the engines' own queue
        does, so they count as waiting; a router that does not answer adds nothing."""
        texts = [self._get(url) for url in urls]
        ready = sum(1 for t in texts if t is not None)
        if not urls or ready < len(urls):
            self._last = None  # a gap: the next delta would mix populations
            return PoolSignals(now, current, ready, None, None, None, None, None)
        gauges: dict[str, float] = defaultdict(float)
        counters: dict[str, float] = defaultdict(float)
        ttft: dict[float, float] = defaultdict(float)
        itl: dict[float, float] = defaultdict(float)
        for text in texts:
            assert text is not None
            g, c, t, i = parse_engine_metrics(text)
            for src, dst in ((g, gauges), (c, counters), (t, ttft), (i, itl)):
                for k, v in src.items():
                    dst[k] += v  # type: ignore[index]
        sample = _Sample(now, dict(counters), dict(ttft), dict(itl))
        last, self._last = self._last, sample
        held = sum(held_by_router(self._get(u), router_role) for u in router_urls)  # only once the pool answered
        running, waiting = gauges[m.RUNNING], gauges[m.WAITING] + held
        kv = gauges[m.KV_USAGE] / len(urls)
        if last is None or now <= last.time:
            return PoolSignals(now, current, ready, None, running, None, None, None, kv, waiting)
        dt = now - last.time
        key = "uncached_prompt_tokens"
        tps = (sample.counters.get(key, 0.0) - last.counters.get(key, 0.0)) / dt
        d_ttft = {b: sample.ttft[b] - last.ttft.get(b, 0.0) for b in sample.ttft}
        d_itl = {b: sample.itl[b] - last.itl.get(b, 0.0) for b in sample.itl}
        first_tokens = d_ttft[max(d_ttft)] if d_ttft else 0.0   # the +Inf bucket counts every request
        key = "cached_prompt_tokens"
        cached = (sample.counters.get(key, 0.0) - last.counters.get(key, 0.0)) / dt
        ttft_sum = sample.counters.get("ttft_sum", 0.0) - last.counters.get("ttft_sum", 0.0)
        return PoolSignals(now, current, ready, tps, running, quantile_from_buckets(d_ttft, 0.9),
                           quantile_from_buckets(d_itl, 0.9), share_within(d_ttft, self.ttft_slo_s), kv, waiting,
                           quantile_from_buckets(d_ttft, 0.5), first_tokens / dt, cached,
                           ttft_mean_s=ttft_sum / first_tokens if first_tokens > 0 and ttft_sum > 0 else None)


class PromSignals:
    """The same signals as PromQL over Prometheus' HTTP API, for pods matched by `selector`
    (a PromQL label matcher such as `job="kvpilot",pool="llama-decode"`)."""

    def __init__(self, base_url: str, selector: str, ttft_slo_s: float, window: str = "1m",
                 timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.sel = selector
        self.ttft_slo_s = ttft_slo_s
        self.window = window
        self.timeout_s = timeout_s

    def query(self, promql: str) -> float | None:
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read())
        except (OSError, ValueError):
            return None
        result = payload.get("data", {}).get("result", [])
        if payload.get("status") != "success" or not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def read(self, now: float, current: int, ready: int) -> PoolSignals:
        s, w = self.sel, self.window
        le = self._bucket_at_or_below(self.ttft_slo_s)
        attainment = self.query(
            f'sum(rate(vllm:time_to_first_token_seconds_bucket{{{s},le="{le}"}}[{w}]))'
            f' / sum(rate(vllm:time_to_first_token_seconds_count{{{s}}}[{w}]))')
        return PoolSignals(
            now, current, ready,
            self.query(f'sum(rate(vllm:prompt_tokens_by_source_total{{{s},source="local_compute"}}[{w}]))'),
            self.query(f"sum(vllm:num_requests_running{{{s}}})"),
            self.query(f"histogram_quantile(0.9, sum by (le) (rate({m.TTFT}_bucket{{{s}}}[{w}])))"),
            self.query(f"histogram_quantile(0.9, sum by (le) (rate({m.ITL}_bucket{{{s}}}[{w}])))"),
            attainment,
            self.query(f"avg(vllm:kv_cache_usage_perc{{{s}}})"),
            self.query(f"sum(vllm:num_requests_waiting{{{s}}})"),
            self.query(f"histogram_quantile(0.5, sum by (le) (rate({m.TTFT}_bucket{{{s}}}[{w}])))"),
            self.query(f"sum(rate({m.TTFT}_count{{{s}}}[{w}]))"),
            self.query(f'sum(rate(vllm:prompt_tokens_by_source_total{{{s},source="local_cache_hit"}}[{w}]))'),
            ttft_mean_s=self.query(f"sum(rate({m.TTFT}_sum{{{s}}}[{w}])) / sum(rate({m.TTFT}_count{{{s}}}[{w}]))"))

    @staticmethod
    def _bucket_at_or_below(limit: float) -> str:
        """vLLM's TTFT bucket bound closest below the SLO, as Prometheus prints it."""
        bounds = m.LATENCY_BUCKETS
        return repr(max((b for b in bounds if b <= limit), default=bounds[0]))
