"""Migration by resume between two real vLLM instances, through the real router: a greedy streaming
completion is cut on one instance and continued on the other from its prompt + generated token ids;
the client's stream must equal the unmigrated one token by token, and the target must have read the
resumed prompt from its prefix cache."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from vllm_stage import Stage, make_prompt, post_json, router_model

from kvpilot.testing.router import RouterProcess
from kvpilot.testing.vllm import BLOCK_SIZE, SERVED

MAX_TOKENS = 600     # with a ~300-token prompt: within the 1,024-token context, 7 of the 16 cache blocks
CUT_AFTER = 40       # chunks (one token each) the client reads before the move


def _stream(url: str, body: dict[str, Any], rid: str,
            during: Callable[[str], None]) -> tuple[list[dict[str, Any]], str]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-Id": rid})
    payloads: list[dict[str, Any]] = []
    thread: threading.Thread | None = None
    with urllib.request.urlopen(req, timeout=300) as resp:
        source = str(resp.headers["X-Kvpilot-Endpoint"])
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                payloads.append(json.loads(line[6:]))
                if len(payloads) == CUT_AFTER:
                    thread = threading.Thread(target=during, args=(source,))
                    thread.start()
    assert thread is not None, "the stream ended before the move"
    thread.join()
    return payloads, source


def _migrate(router: RouterProcess, rid: str, target: str) -> tuple[int, dict[str, Any]]:
    try:
        out, _ = post_json(router.admin_url + "/kvpilot/migrate", {"request_id": rid, "target": target})
        return 200, out
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_stream_resumed_on_another_instance_equals_the_unmigrated_one(
        pair: Stage, router_factory: Callable[..., RouterProcess]) -> None:
    router = router_factory([router_model(pair, "round-robin", engine="vllm", migration={})])
    prompt = make_prompt("resume", 300)
    body = {"model": SERVED, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    # The unmigrated output on each instance (greedy: the same on both); this warms both prefix caches.
    base = {n: s.post("/v1/completions", body)["choices"][0] for n, s in pair.servers.items()}
    ids = [c["token_ids"] for c in base.values()]
    assert ids[0] == ids[1] and len(ids[0]) == MAX_TOKENS
    prompt_ids = next(iter(base.values()))["prompt_token_ids"]
    before = {n: (s.metric("vllm:prefix_cache_hits_total"), s.metric("vllm:generation_tokens_total"))
              for n, s in pair.servers.items()}

    results: list[tuple[int, dict[str, Any]]] = []
    other = {"tiny-worker-a": "tiny-worker-b", "tiny-worker-b": "tiny-worker-a"}
    payloads, source = _stream(router.url, body, "resume-1",
                               lambda src: results.append(_migrate(router, "resume-1", other[src])))
    status, result = results[0]
    assert status == 200 and result["outcome"] == "migrated" and result["mode"] == "resume", result
    target, cut = other[source], result["resumed_tokens"]
    assert result["target_endpoint"] == target and CUT_AFTER <= cut < MAX_TOKENS

    # Token by token: every id once, in order, and the continuation is the unmigrated one.
    got = [t for p in payloads for c in p["choices"] for t in c["token_ids"]]
    assert got == ids[0]
    assert "".join(c["text"] for p in payloads for c in p["choices"]) == base[source]["text"]
    assert [c["prompt_token_ids"] for p in payloads for c in p["choices"] if c.get("prompt_token_ids")] == [prompt_ids]
    assert {p["id"] for p in payloads} == {payloads[0]["id"]}

    after = {n: (s.metric("vllm:prefix_cache_hits_total"), s.metric("vllm:generation_tokens_total"))
             for n, s in pair.servers.items()}
    # The source was cancelled at the cut (plus what it made while the target prefilled); the target
    # generated exactly the rest.
    assert after[target][1] - before[target][1] == MAX_TOKENS - cut
    assert after[source][1] - before[source][1] < MAX_TOKENS
    # The target found the resumed prompt's full blocks (the baseline's prompt and output) in its cache.
    full_blocks = (len(prompt_ids) + cut - 1) // BLOCK_SIZE
    assert after[target][0] - before[target][0] >= full_blocks * BLOCK_SIZE, (after, before, cut)


def test_a_sampled_stream_resumed_elsewhere_keeps_every_token_before_the_cut(
        pair: Stage, router_factory: Callable[..., RouterProcess]) -> None:
    """With sampling the continuation is T's own (a seed does not carry over a cut): what holds is
    one stream, the tokens before the cut exactly once, the length asked for."""
    router = router_factory([router_model(pair, "round-robin", engine="vllm", migration={})])
    body = {"model": SERVED, "prompt": make_prompt("sampled", 200), "max_tokens": 400, "temperature": 0.8,
            "seed": 7, "ignore_eos": True, "return_token_ids": True}
    base = {n: s.post("/v1/completions", body)["choices"][0]["token_ids"] for n, s in pair.servers.items()}
    results: list[tuple[int, dict[str, Any]]] = []
    other = {"tiny-worker-a": "tiny-worker-b", "tiny-worker-b": "tiny-worker-a"}
    payloads, source = _stream(router.url, body, "resume-2",
                               lambda src: results.append(_migrate(router, "resume-2", other[src])))
    status, result = results[0]
    assert status == 200 and result["outcome"] == "migrated", result
    cut = result["resumed_tokens"]
    got = [t for p in payloads for c in p["choices"] for t in c["token_ids"]]
    assert got[:cut] == base[source][:cut] and len(got) == 400
