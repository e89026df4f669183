"""Router-side queues in the live proxy (DualMap holds requests until their instance can start
them), with real `kvpilot sim serve` workers behind the real router process."""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvpilot.procs import wait_for
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text, token_count

Workers = Callable[..., SimWorker]
Routers = Callable[..., RouterProcess]
# Llama-3.1-8B on an H100 slowed 4×: a 24k-token prefill takes ~4.5 s, long enough to queue behind.
SLOW = ("--profile", "h100-llama3-8b", "--time-scale", "0.25")


def endpoints(workers: list[SimWorker]) -> list[dict[str, str]]:
    return [{"name": f"w{w.port}", "url": w.url} for w in workers]


Answer = tuple[int, dict[str, Any], dict[str, str]]


def post(router: RouterProcess, body: dict[str, Any], timeout: float = 60) -> Answer:
    req = urllib.request.Request(router.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def queued_now(router: RouterProcess) -> float:
    return metric(router.metrics_text(), "kvpilot_router_queue_depth")


def send_without_reading(router: RouterProcess, body: dict[str, Any]) -> http.client.HTTPConnection:
    """Send a request and leave it waiting for its answer; closing the connection hangs up."""
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn


def test_overload_is_held_in_the_router_and_every_request_completes_once(sim_worker_factory: Workers,
                                                                          router_factory: Routers) -> None:
    workers = [sim_worker_factory(*SLOW) for _ in range(2)]
    router = router_factory([{"name": "sim-model", "policy": "dualmap", "endpoints": endpoints(workers),
                              "ttftMs": 20000}], holdBypassLagSeconds=0)   # hold even when this host is loaded
    n = 16
    prompts = [block_text(500 + i, 6000) for i in range(n)]   # distinct: no cache hit shortens the work
    with ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(lambda p: post(router, {"model": "sim-model", "prompt": p, "max_tokens": 4}),
                                prompts))
    assert all(status == 200 for status, _, _ in answers), [a[1] for a in answers if a[0] != 200]
    assert all(len(body["choices"][0]["text"].split()) == 4 for _, body, _ in answers)
    text = router.metrics_text()
    assert metric(text, "kvpilot_router_queued_requests_total") > 0, "the overload should have waited in the router"
    assert queued_now(router) == 0
    # Counted at the workers: each request ran exactly once, and only its own prompt was prefilled.
    done = sum(metric(w.metrics_text(), "vllm:request_success_total") for w in workers)
    assert done == n
    queries = sum(metric(w.metrics_text(), "vllm:prefix_cache_queries_total") for w in workers)
    assert queries == sum(token_count(p) for p in prompts)


def test_a_client_leaving_the_queue_frees_its_slot_and_never_reaches_a_worker(sim_worker_factory: Workers,
                                                                               router_factory: Routers) -> None:
    worker = sim_worker_factory(*SLOW)
    router = router_factory([{"name": "sim-model", "policy": "dualmap", "endpoints": endpoints([worker]),
                              "ttftMs": 60000, "maxQueuedRequests": 1}], holdBypassLagSeconds=0)
    long_prompt = block_text(1, 24000)
    first = send_without_reading(router, {"model": "sim-model", "prompt": long_prompt, "max_tokens": 2})
    wait_for(lambda: metric(worker.metrics_text(), "vllm:num_requests_running") == 1, 10, "the first request to run")
    leaver = send_without_reading(router, {"model": "sim-model", "prompt": block_text(2, 12000), "max_tokens": 2})
    wait_for(lambda: queued_now(router) == 1, 10, "the second request to wait in the router")
    # The queue (one slot) is full: the next request is refused at once, OpenAI-style, with Retry-After.
    status, body, headers = post(router, {"model": "sim-model", "prompt": "one more", "max_tokens": 2})
    assert status == 429 and headers.get("Retry-After") == "1"
    assert body["error"]["type"] == "rate_limit_exceeded" and "queue" in body["error"]["message"]
    leaver.close()   # the waiting client hangs up
    wait_for(lambda: queued_now(router) == 0, 10, "the abandoned request to leave the queue")
    with ThreadPoolExecutor(max_workers=1) as pool:
        later_prompt = block_text(3, 200)
        later = pool.submit(post, router, {"model": "sim-model", "prompt": later_prompt, "max_tokens": 2})
        wait_for(lambda: queued_now(router) == 1, 10, "the freed slot to take the next request")
        resp = first.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["choices"][0]["text"]
        assert later.result(timeout=60)[0] == 200
    first.close()
    text = worker.metrics_text()
    assert metric(text, "vllm:request_success_total") == 2
    # The abandoned prompt was never sent: the worker only ever looked up the other two.
    assert metric(text, "vllm:prefix_cache_queries_total") == token_count(long_prompt) + token_count(later_prompt)
