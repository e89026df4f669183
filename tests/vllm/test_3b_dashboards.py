"""The dashboards' engine panels work for plain vLLM pods: Prometheus scraping two real vLLM
instances that no kvpilot PodMonitor labelled (no namespace/service/role labels) answers every panel
query made only of vLLM's metrics, with every variable at "All"."""

from __future__ import annotations

from collections.abc import Callable

from vllm_stage import Stage, make_prompt

from kvpilot.dashboards.queries import load_all, metric_names, problems
from kvpilot.procs import wait_for
from kvpilot.testing.prometheus import PrometheusServer


def test_engine_panels_answer_on_plain_vllm(pair: Stage, prometheus_factory: Callable[..., PrometheusServer]) -> None:
    prom = prometheus_factory([s.url.removeprefix("http://") for s in pair.servers.values()])
    # NIXL's counters appear only with the NIXL connector (the P/D stage), not on an aggregated pair.
    engine = [e for e in load_all() if e.kind == "panel" and (names := metric_names(e.expr))
              and all(n.startswith("vllm:") and "nixl" not in n for n in names)]
    assert len(engine) >= 12
    # Counters must be seen before and after the requests: a first scrape that comes after them sees
    # a flat counter, and every rate() stays 0.
    wait_for(lambda: len(prom.query("up == 1")) == len(pair.servers), 60, "Prometheus to scrape both engines")
    for i, server in enumerate(pair.servers.values()):
        client = server.openai_client()
        for j in range(3):
            list(client.completions.create(model="tiny", prompt=make_prompt(f"dash-{i}", 200) + str(j), max_tokens=8,
                                           stream=True, extra_body={"ignore_eos": True}))
    wait_for(lambda: bool(prom.query("rate(vllm:time_to_first_token_seconds_count[1m]) > 0"))
             and bool(prom.query("rate(vllm:inter_token_latency_seconds_count[1m]) > 0")), 60,
             "two scrapes of the requests")
    found = problems(engine, prom.query, prom.metric_names())
    assert not found, "\n".join(found)
