"""`kvpilot sim serve` as a real process, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text

Factory = Callable[..., SimWorker]



def metrics(worker: SimWorker) -> dict[str, float]:
    """Sample name (with labels folded away) → value, summed over label sets."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(worker.metrics_text()):
        for sample in family.samples:
            key = sample.name if "source" not in sample.labels else f"{sample.name}:{sample.labels['source']}"
            out[key] = out.get(key, 0.0) + sample.value
    return out


def test_openai_client_streams_completions_and_chat(sim_worker_factory: Factory) -> None:
    worker = sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5")
    oa = worker.openai_client()
    pieces = []
    usage = None
    for chunk in oa.completions.create(model="sim-model", prompt=block_text(1, 300), max_tokens=20, stream=True,
                                       stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) > 1  # really streamed, not one blob
    assert usage is not None and usage.completion_tokens == 20 and usage.prompt_tokens == 300
    text = "".join(pieces)
    assert len(text.split()) == 20

    # The same request without streaming gives the same text (outputs are deterministic).
    whole = oa.completions.create(model="sim-model", prompt=block_text(1, 300), max_tokens=20)
    assert whole.choices[0].text == text
    assert whole.usage is not None and whole.usage.prompt_tokens_details is not None
    assert whole.usage.prompt_tokens_details.cached_tokens == 288  # 18 of 19 blocks of 16 reused

    chat = oa.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hello"}],
                                      max_tokens=8, stream=True)
    deltas = [c.choices[0].delta.content for c in chat if c.choices and c.choices[0].delta.content]
    assert len("".join(deltas).split()) == 8
    models = oa.models.list()
    assert [m.id for m in models.data] == ["sim-model"]


def test_metrics_parse_and_move_while_requests_run(sim_worker_factory: Factory) -> None:
    worker = sim_worker_factory("--profile", "h100-llama3-8b", "--time-scale", "1")
    before = metrics(worker)
    assert before["vllm:num_requests_running"] == 0
    oa = worker.openai_client()
    stream = oa.completions.create(model="sim-model", prompt=block_text(7, 1024), max_tokens=200, stream=True)
    next(iter(stream))  # the request is now running
    during = metrics(worker)
    assert during["vllm:num_requests_running"] == 1
    assert during["vllm:kv_cache_usage_perc"] > 0
    for _ in stream:
        pass
    after = metrics(worker)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 200
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == 1024
    assert after["vllm:request_success_total"] == before["vllm:request_success_total"] + 1
    assert after["vllm:time_to_first_token_seconds_count"] == before["vllm:time_to_first_token_seconds_count"] + 1
    # A repeat of the prompt shows up as prefix-cache hits, counted in tokens.
    oa.completions.create(model="sim-model", prompt=block_text(7, 1024), max_tokens=1)
    again = metrics(worker)
    assert again["vllm:prefix_cache_hits_total"] - after["vllm:prefix_cache_hits_total"] == 1008
    assert again["vllm:prefix_cache_queries_total"] - after["vllm:prefix_cache_queries_total"] == 1024


def test_reset_prefix_cache_makes_a_repeat_miss(sim_worker_factory: Factory) -> None:
    """POST /reset_prefix_cache (vLLM's dev endpoint) drops the cached blocks: the bench restarts
    runs cold on the same workers with it, so a repeat after a reset must find nothing."""
    worker = sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5")
    oa = worker.openai_client()
    oa.completions.create(model="sim-model", prompt=block_text(9, 512), max_tokens=1)
    warm = metrics(worker)
    oa.completions.create(model="sim-model", prompt=block_text(9, 512), max_tokens=1)
    hit = metrics(worker)
    assert hit["vllm:prefix_cache_hits_total"] - warm["vllm:prefix_cache_hits_total"] > 0
    req = urllib.request.Request(worker.url + "/reset_prefix_cache", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    oa.completions.create(model="sim-model", prompt=block_text(9, 512), max_tokens=1)
    cold = metrics(worker)
    assert cold["vllm:prefix_cache_hits_total"] == hit["vllm:prefix_cache_hits_total"]   # counters keep counting
    assert cold["vllm:prefix_cache_queries_total"] - hit["vllm:prefix_cache_queries_total"] == 512


def test_prefill_and_decode_workers_complete_a_request_together(sim_worker_factory: Factory) -> None:
    # As with vLLM's kv_both connectors, any worker can take either side; the params decide.
    prefill = sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5")
    decode = sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5")
    prompt = block_text(11, 640)
    first = prefill.openai_client().completions.create(
        model="sim-model", prompt=prompt, max_tokens=1, extra_body={"kv_transfer_params": {"do_remote_decode": True}})
    params: dict[str, Any] = first.model_extra["kv_transfer_params"]  # type: ignore[index]
    assert params["do_remote_prefill"] is True and params["remote_block_ids"]
    second = decode.openai_client().completions.create(model="sim-model", prompt=prompt, max_tokens=12,
                                               extra_body={"kv_transfer_params": params})
    assert len(second.choices[0].text.split()) == 12
    m = metrics(decode)
    # The decode worker took the prompt's KV from the transfer and computed only the last token.
    assert m["vllm:prompt_tokens_by_source_total:external_kv_transfer"] == 639
    assert m["vllm:prompt_tokens_by_source_total:local_compute"] == 1
    assert metrics(prefill)["vllm:prompt_tokens_by_source_total:local_compute"] == 640


@pytest.mark.parametrize(("body", "status", "fragment"), [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi", "max_tokens": 0}).encode(), 400, "max_tokens"),
])
def test_bad_requests_get_openai_style_errors(sim_worker_factory: Factory, body: bytes, status: int,
                                             fragment: str) -> None:
    worker = sim_worker_factory("--profile", "h100-qwen2.5-0.5b")
    req = urllib.request.Request(worker.url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == status
    payload = json.loads(err.value.read())
    assert fragment in payload["error"]["message"] and "type" in payload["error"]
