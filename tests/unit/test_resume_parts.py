"""The pure part of migration by resume: which requests qualify, the target's body, the rewritten chunks."""

from __future__ import annotations

import json
from typing import Any

from kvpilot.router.resume import ResumeState, continuation, refusal, split_events, upstream_body
from kvpilot.sim.responses import WORDS as _WORDS
from kvpilot.sim.token_ids import WORD_BASE, decode_prompt, encode


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _choice(text: str, ids: list[int] | None, prompt_ids: list[int] | None = None,
            finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "text": text, "finish_reason": finish, "prompt_token_ids": prompt_ids, "token_ids": ids}


def test_only_streaming_completions_ask_for_ids_and_only_plain_ones_qualify() -> None:
    assert upstream_body({"prompt": "x", "stream": True})["return_token_ids"] is True
    assert "return_token_ids" not in upstream_body({"prompt": "x"})
    assert "return_token_ids" not in upstream_body({"messages": [], "stream": True})
    assert refusal({"prompt": "x", "temperature": 0.7, "seed": 3}) is None
    for body in ({"messages": []}, {"prompt": "x", "n": 2}, {"prompt": "x", "echo": True},
                 {"prompt": "x", "stop": ["\n"]}):
        assert refusal(body) is not None, body


def test_the_continuation_extends_the_prompt_and_shrinks_the_budgets() -> None:
    body = {"model": "m", "prompt": "hello", "max_tokens": 10, "min_tokens": 4, "temperature": 0, "stream": True}
    out = continuation(body, [1, 2, 3], [7, 8, 9, 9, 9])
    assert out["prompt"] == [1, 2, 3, 7, 8, 9, 9, 9]
    assert (out["max_tokens"], out["min_tokens"], out["temperature"], out["return_token_ids"]) == (5, 0, 0, True)
    assert body["prompt"] == "hello" and body["max_tokens"] == 10   # the client's body is left alone
    assert "max_tokens" not in continuation({"prompt": "x"}, [1], [2])  # the engine's default: rest of context


def test_events_are_recorded_and_the_continuation_looks_like_the_source() -> None:
    st = ResumeState({"prompt": "p", "max_tokens": 6, "stream": True})
    raw = _event({"id": "cmpl-src", "choices": [_choice(" a", [11], prompt_ids=[1, 2, 3])]}) + \
        _event({"id": "cmpl-src", "choices": [_choice(" b", [12])]}) + b"data: {\"id\": \"cm"
    events, rest = split_events(raw)
    assert len(events) == 2 and rest == b"data: {\"id\": \"cm"
    out = [json.loads(st.on_event(e)[6:]) for e in events]
    assert st.prompt_ids == [1, 2, 3] and st.generated == [11, 12] and st.not_now() is None
    # The client did not ask for ids: they are null, as vLLM sends them then.
    assert all(c["token_ids"] is None and c["prompt_token_ids"] is None for o in out for c in o["choices"])
    # After a resume at 2 tokens: the target's id, prompt ids and usage are the source's view.
    st.offset = 2
    tail = st.on_event(_event({"id": "cmpl-tgt", "choices": [_choice(" c", [13], prompt_ids=[1, 2, 3, 11, 12],
                                                                      finish="length")],
                               "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}))
    data = json.loads(tail[6:])
    assert data["id"] == "cmpl-src" and data["choices"][0]["prompt_token_ids"] is None
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert st.prompt_ids == [1, 2, 3] and st.generated == [11, 12, 13]
    assert st.not_now() == "the request has finished"
    assert st.on_event(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"


def test_a_client_that_asked_for_ids_keeps_them() -> None:
    st = ResumeState({"prompt": "p", "stream": True, "return_token_ids": True})
    data = json.loads(st.on_event(_event({"id": "x", "choices": [_choice(" a", [5], prompt_ids=[1])]}))[6:])
    assert data["choices"][0]["token_ids"] == [5] and data["choices"][0]["prompt_token_ids"] == [1]


def test_nothing_to_resume_before_the_first_token() -> None:
    assert ResumeState({"prompt": "p", "stream": True}).not_now() is not None


def test_sim_token_ids_round_trip_and_continue_at_the_generated_position() -> None:
    text = "def cache(self):\n    return 42 — ok"
    ids = encode(text)
    assert all(t < WORD_BASE for t in ids) and decode_prompt(ids, _WORDS) == (text, 0)
    assert decode_prompt([*ids, WORD_BASE + 3, WORD_BASE + 4], _WORDS) == (text, 2)
