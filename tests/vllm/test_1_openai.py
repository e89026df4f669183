"""The official OpenAI client against real vLLM through the router: completions and chat, streaming and not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm_stage import Stage, router_model

from kvpilot.testing.router import RouterProcess


def _successes(pair: Stage) -> float:
    return sum(s.metric("vllm:request_success_total") for s in pair.servers.values())


def test_completions_and_chat_stream_and_not(pair: Stage, router_factory: Callable[..., RouterProcess]) -> None:
    router = router_factory([router_model(pair)])
    client = router.openai_client()
    before = _successes(pair)
    fixed: dict[str, Any] = {"ignore_eos": True}

    done = client.completions.create(model="tiny", prompt="def main(self):", max_tokens=8, extra_body=fixed)
    assert done.model == "tiny" and done.choices[0].text and done.usage is not None
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"

    chunks = list(client.completions.create(model="tiny", prompt="class Cache:", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, extra_body=fixed))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and len(chunks) >= 8
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                          max_tokens=8, extra_body=fixed)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 8

    deltas = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, stream=True, extra_body=fixed))
    assert "".join(d.choices[0].delta.content or "" for d in deltas if d.choices)
    assert [d.choices[0].finish_reason for d in deltas if d.choices][-1] == "length"

    # Four requests, all served by the real engines behind the router.
    assert _successes(pair) - before == 4
