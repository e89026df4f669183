"""The router as a real process in front of real `kvpilot sim serve` workers."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from kvpilot.procs import wait_for
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text

Workers = Callable[..., SimWorker]
Routers = Callable[..., RouterProcess]
FAST = ("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5")


def endpoints(workers: list[SimWorker], role: str = "both") -> list[dict[str, str]]:
    return [{"name": f"w{w.port}", "url": w.url, "role": role} for w in workers]


def served_by(router: RouterProcess, prompt: str, max_tokens: int = 4) -> str:
    """Which endpoint served a request (the router says so in a response header)."""
    status, _, headers = _post(router, {"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens})
    assert status == 200
    return headers["X-Kvpilot-Endpoint"]


def open_stream(router: RouterProcess, body: dict[str, Any]) -> http.client.HTTPConnection:
    """Start a streaming request and read its first bytes; closing the connection hangs up."""
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read1(64)
    return conn


@pytest.fixture
def four_workers(sim_worker_factory: Workers) -> list[SimWorker]:
    return [sim_worker_factory(*FAST) for _ in range(4)]


def test_openai_client_streams_through_the_router(four_workers: list[SimWorker], router_factory: Routers) -> None:
    router = router_factory([{"name": "sim-model", "policy": "dualmap", "endpoints": endpoints(four_workers)}])
    oa = router.openai_client()
    chunks = [c for c in oa.completions.create(model="sim-model", prompt=block_text(3, 200), max_tokens=24,
                                               stream=True, stream_options={"include_usage": True})]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(text.split()) == 24
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    chat = oa.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert len((chat.choices[0].message.content or "").split()) == 5
    assert [m.id for m in oa.models.list().data] == ["sim-model"]


def test_shared_prefixes_stick_under_light_load_and_spread_under_heavy(four_workers: list[SimWorker],
                                                                        router_factory: Routers) -> None:
    router = router_factory([{"name": "sim-model", "policy": "dualmap", "endpoints": endpoints(four_workers),
                              "ttftMs": 400}])
    head = block_text(42, 2048)  # a long shared system prompt
    light = {served_by(router, head + block_text(1000 + i, 32)) for i in range(8)}
    assert len(light) == 1, f"light load should keep one prefix on one worker, got {light}"
    # Heavy: many concurrent long prompts behind the same head exceed θ·SLO on the affine worker.
    with ThreadPoolExecutor(max_workers=32) as pool:
        heavy = list(pool.map(lambda i: served_by(router, head + block_text(2000 + i, 4096), 64), range(48)))
    counts = Counter(heavy)
    assert len(counts) >= 2, f"heavy load should spill to the second candidate, got {counts}"
    metrics = router.metrics_text()
    assert 'reason="slo-fallback"' in metrics and 'reason="affinity"' in metrics


def test_worker_dead_before_first_byte_is_retried_elsewhere(sim_worker_factory: Workers,
                                                            router_factory: Routers) -> None:
    good = [sim_worker_factory(*FAST) for _ in range(2)]
    bad = sim_worker_factory(*FAST, "--error-rate", "1.0")
    router = router_factory([{"name": "sim-model", "policy": "round-robin", "endpoints": endpoints([bad, *good])}],
                            maxRetries=2, scrapeIntervalSeconds=30)
    for i in range(6):  # round-robin lands on the failing worker every third request
        req = urllib.request.Request(
            router.url + "/v1/completions", headers={"Content-Type": "application/json", "X-Request-Id": f"trace-{i}"},
            data=json.dumps({"model": "sim-model", "prompt": block_text(i, 64), "max_tokens": 3}).encode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.headers["X-Request-Id"] == f"trace-{i}"  # the client's id is echoed back
            assert len(json.loads(resp.read())["choices"][0]["text"].split()) == 3
    metrics = router.metrics_text()
    assert "kvpilot_router_retries_total" in metrics
    assert f'kvpilot_router_upstream_errors_total{{endpoint="w{bad.port}",model="sim-model"}}' in metrics
    # Each failed attempt is logged as JSON with the request id the client sent.
    lines = [json.loads(line) for line in router.proc.log_path.read_text().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line["msg"].startswith("upstream attempt failed")]
    assert failed and all(line["request_id"].startswith("trace-") and line["endpoint"] == f"w{bad.port}"
                          for line in failed)
    # The dashboard counts client requests, not attempts: a retry is a decision, not a request.
    assert _dashboard_counts(router) == (6, 6 + len(failed))


def test_killed_worker_leaves_the_pool(sim_worker_factory: Workers, router_factory: Routers) -> None:
    workers = [sim_worker_factory(*FAST) for _ in range(2)]
    router = router_factory([{"name": "sim-model", "policy": "dualmap", "endpoints": endpoints(workers)}],
                            scrapeIntervalSeconds=0.2, breakerFailures=2, breakerCooldownSeconds=30)
    workers[0].stop()
    oa = router.openai_client()
    for i in range(10):
        out = oa.completions.create(model="sim-model", prompt=block_text(100 + i, 64), max_tokens=2)
        assert out.choices[0].text
    wait_for(lambda: 'kvpilot_router_healthy_endpoints{model="sim-model",role="main"} 1.0' in router.metrics_text(),
             10, "the dead worker's breaker to open")


def test_prefill_decode_request_completes_through_the_router(sim_worker_factory: Workers,
                                                             router_factory: Routers) -> None:
    prefill = sim_worker_factory(*FAST)
    decode = sim_worker_factory(*FAST)
    router = router_factory([{"name": "sim-model", "policy": "dualmap", "mode": "disaggregated",
                              "endpoints": endpoints([prefill], "prefill") + endpoints([decode], "decode")}])
    oa = router.openai_client()
    stream = oa.completions.create(model="sim-model", prompt=block_text(9, 512), max_tokens=10, stream=True)
    assert len("".join(c.choices[0].text for c in stream if c.choices).split()) == 10
    assert _dashboard_counts(router) == (1, 2)  # one request, a prefill and a decode decision
    pm, dm = prefill.metrics_text(), decode.metrics_text()
    assert 'vllm:generation_tokens_total{engine="0",model_name="sim-model"} 1.0' in pm
    assert 'vllm:generation_tokens_total{engine="0",model_name="sim-model"} 10.0' in dm
    assert 'source="external_kv_transfer"} 511.0' in dm


def _post(router: RouterProcess, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(router.url + "/v1/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_bad_input_and_no_endpoint_get_clear_errors(sim_worker_factory: Workers, router_factory: Routers) -> None:
    worker = sim_worker_factory(*FAST)
    router = router_factory([{"name": "sim-model", "endpoints": endpoints([worker])},
                             {"name": "empty-model", "endpoints": []}], maxBodyBytes=4096)
    status, body, _ = _post(router, b"{nope")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body, _ = _post(router, {"prompt": "hi"})
    assert status == 400 and body["error"]["param"] == "model"
    status, body, _ = _post(router, {"model": "nope", "prompt": "hi"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body, _ = _post(router, {"model": "sim-model", "prompt": "x" * 10_000})
    assert status == 413
    status, body, _ = _post(router, {"model": "sim-model", "prompt": "hi", "max_tokens": -1})
    assert status == 400 and "max_tokens" in body["error"]["message"]  # the worker's 4xx passes through
    status, body, headers = _post(router, {"model": "empty-model", "prompt": "hi"})
    assert status == 503 and headers.get("Retry-After") and "no healthy endpoint" in body["error"]["message"]


def test_client_disconnect_cancels_the_upstream_request(sim_worker_factory: Workers,
                                                        router_factory: Routers) -> None:
    worker = sim_worker_factory("--profile", "h100-llama3-8b")
    router = router_factory([{"name": "sim-model", "endpoints": endpoints([worker])}])
    conn = open_stream(router, {"model": "sim-model", "prompt": block_text(5, 256), "max_tokens": 5000})
    assert 'vllm:num_requests_running{engine="0",model_name="sim-model"} 1.0' in worker.metrics_text()
    conn.close()
    # The client hung up: the router must cancel upstream, and the worker must free the request.
    wait_for(lambda: 'vllm:num_requests_running{engine="0",model_name="sim-model"} 0.0' in worker.metrics_text(),
             10, "the worker to drop the abandoned request")
    assert 'vllm:request_success_total{engine="0",model_name="sim-model"} 0.0' in worker.metrics_text()


def test_saturated_pool_answers_429(sim_worker_factory: Workers, router_factory: Routers) -> None:
    worker = sim_worker_factory("--profile", "h100-llama3-8b")
    router = router_factory([{"name": "sim-model", "endpoints": endpoints([worker]), "maxInflightPerEndpoint": 1}])
    conn = open_stream(router, {"model": "sim-model", "prompt": "hold", "max_tokens": 2000})
    status, body, headers = _post(router, {"model": "sim-model", "prompt": "hi"})
    conn.close()
    assert status == 429 and headers.get("Retry-After") == "1"
    assert body["error"]["type"] == "rate_limit_exceeded"


def _dashboard_counts(router: RouterProcess) -> tuple[int, int]:
    """(requests, routing decisions) in the router's dashboard timeline."""
    with urllib.request.urlopen(router.admin_url + "/dashboard/data", timeout=5) as resp:
        series = json.loads(resp.read())["models"][0]["series"]
    return sum(p["requests"] for p in series), sum(sum(p["reasons"].values()) for p in series)
