"""vLLM's Prometheus metric names, read from the engine at scrape time.

Counters and gauges are computed from the engine's own counters when Prometheus scrapes, so the
engine's hot loop does no metric bookkeeping. Names and meanings follow vLLM V1 (prefix-cache
queries and hits are counted in tokens; KV usage is 0–1).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvpilot.sim.engine import Engine

# The one gauge here vLLM lacks: router/engine_load.py reads it under this name.
PENDING_PROMPT_TOKENS = "kvpilot:pending_prompt_tokens"


class EngineCollector(Collector):
    def __init__(self, engine: Engine, labels: dict[str, str]) -> None:
        self.engine = engine
        self.label_names = list(labels)
        self.label_values = list(labels.values())

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=self.label_names)
        g.add_metric(self.label_values, value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=self.label_names)
        c.add_metric(self.label_values, value)
        return c

    def collect(self) -> Iterator[Metric]:
        e, c = self.engine, self.engine.counters
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", e.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", e.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", e.kv_usage())
        yield self._gauge(PENDING_PROMPT_TOKENS, "Prompt tokens of requests before their first token (not in vLLM).",
                          e.pending_prompt_tokens())
        yield self._counter("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens.", c.prefix_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.", c.prefix_cache_hits)
        yield self._counter("vllm:prompt_tokens", "Prefill tokens processed.", c.prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Generation tokens processed.", c.generation_tokens)
        yield self._counter("vllm:request_success", "Successfully finished requests.", c.request_success)
        yield self._counter("vllm:num_preemptions", "Cumulative preemptions.", c.num_preemptions)
        by_source = CounterMetricFamily("vllm:prompt_tokens_by_source", "Prompt tokens by where their KV came from.",
                                        labels=[*self.label_names, "source"])
        for source, value in (("local_compute", c.prompt_tokens_local_compute),
                              ("local_cache_hit", c.prompt_tokens_local_cache_hit),
                              ("external_kv_transfer", c.prompt_tokens_external)):
            by_source.add_metric([*self.label_values, source], value)
        yield by_source
