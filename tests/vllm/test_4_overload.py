"""Overload on a tiny KV cache: real queueing and preemption in the engine, and the router's view of it."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vllm_stage import Stage, make_prompt, post_json, router_model

from kvpilot.procs import wait_for
from kvpilot.testing.router import RouterProcess


def _router_loads(url: str) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(url + "/dashboard/data", timeout=5) as resp:
        data = json.loads(resp.read())
    return {e["name"]: e for e in data["models"][0]["endpoints"]}


def test_overload_shows_in_engine_queue_and_router_load(pair: Stage,
                                                        router_factory: Callable[..., RouterProcess]) -> None:
    router = router_factory([router_model(pair, policy="least-loaded")], scrapeIntervalSeconds=0.2)
    preempted = {n: s.metric("vllm:num_preemptions_total") for n, s in pair.servers.items()}
    # 12 × (300 prompt + 300 output) tokens over two instances of 2,048 KV tokens each.
    bodies = [{"model": "tiny", "prompt": make_prompt(f"load-{i}", 300), "max_tokens": 300, "ignore_eos": True}
              for i in range(12)]
    engine_waiting: dict[str, int] = {n: 0 for n in pair.servers}
    router_waiting: dict[str, int] = {n: 0 for n in pair.servers}
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(post_json, router.url + "/v1/completions", b, 300) for b in bodies]
        while not all(f.done() for f in futures):
            for name, server in pair.servers.items():
                engine_waiting[name] = max(engine_waiting[name], int(server.metric("vllm:num_requests_waiting")))
            for name, load in _router_loads(router.admin_url).items():
                router_waiting[name] = max(router_waiting[name], load["engine_waiting"])
            time.sleep(0.1)
        results = [f.result()[0] for f in futures]
    assert all(r["usage"]["completion_tokens"] == 300 for r in results)
    # The engine queued (and usually preempted): its cache cannot hold six such requests at once.
    assert max(engine_waiting.values()) > 0, engine_waiting
    gained = {n: s.metric("vllm:num_preemptions_total") - preempted[n] for n, s in pair.servers.items()}
    # The router's scraped load signal saw the queue on the instances where the engine had one.
    for name, waited in engine_waiting.items():
        if waited > 1:
            assert router_waiting[name] > 0, (engine_waiting, router_waiting, gained)
    # And it follows the queue back down once the burst is served.
    wait_for(lambda: all(v["engine_waiting"] == 0 and v["engine_running"] == 0
                         for v in _router_loads(router.admin_url).values()), 10, "router load back to idle")
