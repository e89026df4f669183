"""The router's typed check of OpenAI request bodies: wrong types and non-finite numbers are 400s
naming the field; unknown fields pass through; unsupported shapes are refused clearly."""

from __future__ import annotations

from typing import Any

import pytest

from kvpilot.openai_errors import ApiError
from kvpilot.router.openai_schema import ChatRequest, CompletionRequest, sequences, validate

OK = {"model": "m", "prompt": "hello"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _param(body: dict[str, Any], chat: bool = False) -> str | None:
    with pytest.raises(ApiError) as err:
        validate(body, chat)
    assert err.value.status == 400
    assert err.value.body()["error"]["type"] == "invalid_request_error"
    return err.value.param


@pytest.mark.parametrize(("field", "value"), [
    ("stream", "yes"), ("stream", 1), ("temperature", "NaN"), ("temperature", "0.5"), ("temperature", float("nan")),
    ("temperature", float("inf")), ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0),
    ("max_tokens", 2.5), ("max_tokens", "16"), ("max_tokens", True), ("n", 0), ("seed", "1"),
    ("presence_penalty", float("-inf")), ("stop", 3), ("stop", ["a", 1]), ("logit_bias", {"1": "x"}),
    ("model", ""), ("echo", "true"), ("stream_options", []), ("presence_penalty", 10**400), ("seed", 2**64),
    ("max_tokens", 2**40), ("temperature", 10**400),
])
def test_wrong_types_and_values_name_the_field(field: str, value: Any) -> None:
    param = _param({**OK, field: value})
    assert param is not None and param.split(".")[0] == field


def test_nested_errors_name_the_path() -> None:
    assert _param({"model": "m", "messages": [{"role": "user"}, {"content": "x"}]}, chat=True) == "messages[1].role"
    assert _param({"model": "m", "messages": []}, chat=True) == "messages"
    assert _param({"model": "m", "messages": "hi"}, chat=True) == "messages"
    assert _param({"model": "m", "messages": [{"role": "user", "content": 5}]}, chat=True) == "messages[0].content"
    assert _param({**OK, "logit_bias": {"50256": float("nan")}}) == "logit_bias.50256"


def test_prompt_lists_and_token_ids_are_refused_with_a_reason() -> None:
    with pytest.raises(ApiError, match="one request per prompt") as err:
        validate({**OK, "prompt": ["a", "b"]}, False)
    assert err.value.param == "prompt"
    with pytest.raises(ApiError, match="token ids"):
        validate({**OK, "prompt": [1, 2, 3]}, False)
    assert _param({"model": "m", "prompt": 5}) == "prompt"
    assert _param({"model": "m"}) == "prompt"
    assert isinstance(validate({**OK, "prompt": ["only one"]}, False), CompletionRequest)


def test_valid_bodies_pass_with_their_extensions() -> None:
    body = {**OK, "stream": True, "temperature": 0, "top_p": 1, "max_tokens": 8, "stop": ["\n"],
            "logit_bias": {"1": -100}, "kv_transfer_params": {"x": 1}, "return_token_ids": True, "top_k": -1}
    req = validate(body, False)
    assert req.model_extra is not None and req.model_extra["kv_transfer_params"] == {"x": 1}
    chat = validate({**CHAT, "max_completion_tokens": 4, "logprobs": True, "tools": [{"type": "function"}],
                     "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, True)
    assert isinstance(chat, ChatRequest)


def test_sequences_counts_n_and_best_of() -> None:
    assert sequences(validate(OK, False)) == 1
    assert sequences(validate({**OK, "n": 3}, False)) == 3
    assert sequences(validate({**OK, "best_of": 4, "n": 2}, False)) == 4
    assert sequences(validate({**CHAT, "n": 2}, True)) == 2
