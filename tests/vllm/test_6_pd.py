"""P/D through the router: prefill on one vLLM, decode on another, KV moved by NixlConnector (CPU)."""

from __future__ import annotations

from collections.abc import Callable

from vllm_stage import Stage, make_prompt, router_model

from kvpilot.testing.router import RouterProcess
from kvpilot.testing.vllm import BLOCK_SIZE

EXTERNAL = {"source": "external_kv_transfer"}


def test_request_flows_prefill_to_decode_with_kv_transferred(pd: Stage,
                                                             router_factory: Callable[..., RouterProcess]) -> None:
    router = router_factory([router_model(pd)])
    prefill, decode = pd.servers["tiny-prefill-a"], pd.servers["tiny-decode-a"]
    client = router.openai_client()
    for i, stream in enumerate((False, True)):
        p_done = prefill.metric("vllm:request_success_total")
        moved = decode.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL)
        computed = decode.metric("vllm:prompt_tokens_by_source_total", source="local_compute")
        prompt = make_prompt(f"pd-{i}", 4 * BLOCK_SIZE + 40)
        if stream:
            chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=16, stream=True,
                                                    stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
            usage = chunks[-1].usage
            assert "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=16,
                                                              extra_body={"ignore_eos": True})
            assert raw.headers["X-Kvpilot-Endpoint"] == "tiny-decode-a"
            usage = raw.parse().usage
        assert usage is not None and usage.completion_tokens == 16
        # The prefill instance ran the prompt (max_tokens=1) ...
        assert prefill.metric("vllm:request_success_total") - p_done == 1
        # ... and the decode instance got the prompt's KV from it instead of computing it.
        transferred = decode.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL) - moved
        local = decode.metric("vllm:prompt_tokens_by_source_total", source="local_compute") - computed
        assert transferred >= 4 * BLOCK_SIZE, (transferred, local, usage.prompt_tokens)
        assert local < transferred
