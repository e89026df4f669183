"""Migration by resume (`engine: vllm`) through the real router, with simulator workers standing in
for vLLM: they take token-id prompts, report token ids and decode greedily (`kvpilot.sim.token_ids`).
The client's stream must equal the unmigrated one token by token; a failing target must leave the
request on its source."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text

Workers = Callable[..., SimWorker]
Routers = Callable[..., RouterProcess]
PROMPT = block_text(91, 2000)
MAX_TOKENS = 600
# 0.5× real time: ~5 ms per token on the small model, so the stream outlives the move.
FLAGS = ("--profile", "h100-qwen2.5-0.5b", "--time-scale", "0.5")


def _router(router_factory: Routers, workers: dict[str, SimWorker]) -> RouterProcess:
    eps = [{"name": name, "url": w.url} for name, w in workers.items()]
    return router_factory([{"name": "sim-model", "policy": "round-robin", "endpoints": eps, "engine": "vllm",
                            "migration": {}}], scrapeIntervalSeconds=30)


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metric(text: str, name: str, **labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()))


def _stream(url: str, body: dict[str, Any], rid: str, during: Callable[[str], None] | None = None,
            after_chunks: int = 25) -> tuple[list[dict[str, Any]], str]:
    """The stream's data payloads (raw JSON, as the client got them) and the endpoint that took it
    first; `during(endpoint)` runs on a thread once `after_chunks` chunks are in."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-Id": rid})
    payloads: list[dict[str, Any]] = []
    thread: threading.Thread | None = None
    with urllib.request.urlopen(req, timeout=60) as resp:
        endpoint = str(resp.headers.get("X-Kvpilot-Endpoint", ""))
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payloads.append(json.loads(line[6:]))
            if during is not None and len(payloads) == after_chunks:
                thread = threading.Thread(target=during, args=(endpoint,))
                thread.start()
    if thread is not None:
        thread.join()
    return payloads, endpoint


def _words(payloads: list[dict[str, Any]]) -> list[str]:
    return "".join(c["text"] for p in payloads for c in p["choices"]).split()


def test_resumed_stream_equals_the_unmigrated_one(sim_worker_factory: Workers, router_factory: Routers) -> None:
    workers = {"a": sim_worker_factory(*FLAGS), "b": sim_worker_factory(*FLAGS)}
    router = _router(router_factory, workers)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream_options": {"include_usage": True}}
    # The unmigrated output, from both instances (this also warms both prefix caches with the prompt).
    baselines = [_words(_stream(w.url, body, f"base-{n}")[0]) for n, w in workers.items()]
    assert baselines[0] == baselines[1] and len(baselines[0]) == MAX_TOKENS
    hits = {n: _metric(w.metrics_text(), "vllm:prefix_cache_hits_total") for n, w in workers.items()}

    results: list[tuple[int, dict[str, Any]]] = []

    def migrate(source: str) -> None:
        target = "b" if source == "a" else "a"
        results.append(_post(router.admin_url + "/kvpilot/migrate", {"request_id": "r-1", "target": target}))

    payloads, source = _stream(router.url, body, "r-1", migrate)
    status, result = results[0]
    assert status == 200 and result["outcome"] == "migrated" and result["mode"] == "resume", result
    assert result["source"] == source and result["resumed_tokens"] >= 25
    target = result["target_endpoint"]
    # Token by token: nothing missing, nothing repeated, and the continuation is the unmigrated one.
    assert _words(payloads) == baselines[0]
    # One stream as far as the client can tell: one id, no token ids it did not ask for, usage
    # counted against its own prompt.
    assert {p["id"] for p in payloads} == {payloads[0]["id"]}
    assert not any(c.get("token_ids") or c.get("prompt_token_ids") for p in payloads for c in p["choices"])
    usage = payloads[-1]["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS and usage["prompt_tokens"] == len(PROMPT) // 4, usage
    # The source stopped at the cut (its request was cancelled); the target re-read the prompt from
    # its prefix cache and generated the rest.
    gen = {n: _metric(w.metrics_text(), "vllm:generation_tokens_total") for n, w in workers.items()}
    assert gen[target] == MAX_TOKENS + (MAX_TOKENS - result["resumed_tokens"])
    assert gen[source] < 2 * MAX_TOKENS - 100
    gained = _metric(workers[target].metrics_text(), "vllm:prefix_cache_hits_total") - hits[target]
    assert gained >= len(PROMPT) // 4 - 256, gained
    text = router.metrics_text()
    assert _metric(text, "kvpilot_router_migrations_total", outcome="migrated") == 1


@pytest.mark.parametrize("pre_copy", [False, True], ids=["aligned", "aligned+precopy"])
def test_an_aligned_cut_waits_for_the_stream_to_pass_a_block_boundary(pre_copy: bool, sim_worker_factory: Workers,
                                                                     router_factory: Routers) -> None:
    """The simulator reports no KV block size, so the config gives one; the client reads on while the
    router waits, and the stream is still the unmigrated one. With a pre-copy the target also
    serves the 1-token warm request of the stream so far."""
    workers = {"a": sim_worker_factory(*FLAGS), "b": sim_worker_factory(*FLAGS)}
    eps = [{"name": name, "url": w.url} for name, w in workers.items()]
    migration = {"blockSize": 64, "cutSlackTokens": 2, "alignCutTokens": 64, "preCopy": pre_copy}
    router = router_factory([{"name": "sim-model", "policy": "round-robin", "endpoints": eps, "engine": "vllm",
                              "migration": migration}], scrapeIntervalSeconds=30)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "return_token_ids": True}
    baseline, _ = _stream(workers["a"].url, body, "base")
    results: list[tuple[int, dict[str, Any]]] = []
    gen = {n: _metric(w.metrics_text(), "vllm:generation_tokens_total") for n, w in workers.items()}

    def migrate(source: str) -> None:
        results.append(_post(router.admin_url + "/kvpilot/migrate",
                             {"request_id": "r-al", "target": "b" if source == "a" else "a"}))

    payloads, _ = _stream(router.url, body, "r-al", migrate)
    status, result = results[0]
    assert status == 200 and result["outcome"] == "migrated", result
    target = result["target_endpoint"]
    made = _metric(workers[target].metrics_text(), "vllm:generation_tokens_total") - gen[target]
    assert made == MAX_TOKENS - result["resumed_tokens"] + (1 if pre_copy else 0), (made, result)
    prompt_tokens = len(baseline[0]["choices"][0]["prompt_token_ids"])
    resumed = prompt_tokens + result["resumed_tokens"]
    # Cut where the target's prompt is 2 tokens + 1 past a 64-token boundary, after waiting for it.
    assert (resumed - 1) % 64 == 2 and result["target_tail_tokens"] == 3, (resumed, result)
    assert 0 < result["cut_wait_tokens"] < 64 and result["resumed_tokens"] > 25, result
    ids = [t for p in payloads for c in p["choices"] for t in c["token_ids"]]
    assert ids == [t for p in baseline for c in p["choices"] for t in c["token_ids"]]
    assert _words(payloads) == _words(baseline)


def test_a_failing_target_leaves_the_request_on_its_source(sim_worker_factory: Workers,
                                                           router_factory: Routers) -> None:
    good = sim_worker_factory(*FLAGS)
    bad = sim_worker_factory(*FLAGS, "--error-rate", "1")   # answers 500 before any work
    router = _router(router_factory, {"good": good, "bad": bad})
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 300, "return_token_ids": True}
    baseline, _ = _stream(good.url, body, "base")
    results: list[tuple[int, dict[str, Any]]] = []
    payloads, source = _stream(router.url, body, "r-2", lambda _: results.append(
        _post(router.admin_url + "/kvpilot/migrate", {"request_id": "r-2", "target": "bad"})))
    assert source == "good"
    status, result = results[0]
    assert status == 502 and result["outcome"] == "aborted" and "HTTP 500" in result["reason"], result
    # The client asked for ids: it gets them, once, and the stream is the unmigrated one.
    assert _words(payloads) == _words(baseline)
    ids = [t for p in payloads for c in p["choices"] for t in c["token_ids"]]
    assert ids == [t for p in baseline for c in p["choices"] for t in c["token_ids"]]
    assert [c["prompt_token_ids"] for p in payloads for c in p["choices"] if c.get("prompt_token_ids")] == \
        [baseline[0]["choices"][0]["prompt_token_ids"]]
    assert _metric(router.metrics_text(), "kvpilot_router_migrations_total", outcome="aborted") == 1


def test_chat_streams_are_not_migratable_by_resume(sim_worker_factory: Workers, router_factory: Routers) -> None:
    workers = {"a": sim_worker_factory(*FLAGS), "b": sim_worker_factory(*FLAGS)}
    router = _router(router_factory, workers)
    results: list[tuple[int, dict[str, Any]]] = []
    body = {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 200,
            "stream": True}
    req = urllib.request.Request(router.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-Id": "chat-1"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        for n, _ in enumerate(resp):
            if n == 20:
                results.append(_post(router.admin_url + "/kvpilot/migrate", {"request_id": "chat-1"}))
    status, result = results[0]
    assert status == 409 and result["outcome"] == "rejected" and "chat" in result["reason"], result


def test_the_automatic_trigger_moves_streams_by_resume(sim_worker_factory: Workers, router_factory: Routers) -> None:
    workers = [sim_worker_factory(*FLAGS), sim_worker_factory(*FLAGS)]
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    expected = _words(_stream(workers[0].url, body, "base")[0])
    eps = [{"name": f"w{w.port}", "url": w.url} for w in workers]
    # A 1 ms TPOT SLO: any instance streaming is a hot spot, an idle one is cool.
    migration = {"enabled": True, "tpotMs": 1, "theta": 0.8, "intervalSeconds": 0.5}
    router = router_factory([{"name": "sim-model", "policy": "round-robin", "endpoints": eps, "engine": "vllm",
                              "migration": migration}], scrapeIntervalSeconds=30)
    assert _words(_stream(router.url, body, "auto-1")[0]) == expected
    assert _metric(router.metrics_text(), "kvpilot_router_migrations_total", outcome="migrated") >= 1
