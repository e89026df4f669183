"""What one engine poll costs the router: parsing a simulator's /metrics page (vLLM's names, its
histograms included) whole with prometheus_client, against `read_metrics`, which parses only the
families the router reads. CPU time of the parse alone, no HTTP.

    .venv/bin/python -P bench/engine_poll.py [--polls 500]

The router polls every engine every `scrapeIntervalSeconds` (0.25 s), so at 8 engines one parse
of N ms costs 32·N ms of the router's event loop per second.
"""

from __future__ import annotations

import argparse
import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.router.engine_load import EngineSample, read_metrics
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.server import ServeConfig, SimServer


def page() -> str:
    """A simulator's page after some traffic: every histogram has observations in its buckets."""
    server = SimServer(ServeConfig(get_profile("h100-llama3-8b")))
    for i in range(200):
        server.h_ttft.observe(0.05 * (i % 40))
        server.h_itl.observe(0.001 * (i % 60))
        server.h_e2e.observe(0.2 * (i % 50))
        server.h_queue.observe(0.01 * (i % 30))
    return generate_latest(server.registry).decode()


def cpu_ms(fn: object, polls: int) -> float:
    assert callable(fn)
    t = time.process_time()
    for _ in range(polls):
        fn()
    return (time.process_time() - t) / polls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=500)
    args = parser.parse_args()
    text = page()
    before = EngineSample(0, 0, 0.0)
    whole = cpu_ms(lambda: list(text_string_to_metric_families(text)), args.polls)
    read = cpu_ms(lambda: read_metrics(text, before), args.polls)
    print(f"page: {len(text)} bytes, {text.count(chr(10))} lines")
    print("| parse | CPU ms per poll | ms of loop per s at 8 engines / 250 ms |\n|---|---:|---:|")
    for name, ms in (("whole page (prometheus_client)", whole), ("read_metrics (the families read)", read)):
        print(f"| {name} | {ms:.3f} | {ms * 32:.1f} |")


if __name__ == "__main__":
    main()
