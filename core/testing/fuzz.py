"""Generated bad (and some good) OpenAI requests, and what every answer to one must look like.

Shared by the integration test (tests/integration/router/test_fuzz.py, a few hundred examples)
and the recorded long run (bench/fuzz_router.py). The strategies aim at the router's boundary:
typed-wrong and non-finite fields, unicode (lone surrogates included), huge and negative
numbers, deep nesting, top-level non-objects, broken JSON, odd charsets and oversized bodies.
Valid requests ask for few tokens so that a run stays short.
"""

from __future__ import annotations

import http.client
import json
import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

PATHS = ("/v1/completions", "/v1/chat/completions")
FIELDS = ("stream", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "best_of", "stop",
          "seed", "logprobs", "top_logprobs", "echo", "presence_penalty", "frequency_penalty", "logit_bias",
          "stream_options", "user", "min_tokens", "top_k", "prompt", "messages", "model", "suffix",
          "kv_transfer_params", "ignore_eos", "extra_unknown_field")
CONTENT_TYPES = ("application/json", "application/json; charset=utf-8", "text/plain",
                 "application/json; charset=utf-16", "application/json; charset=bogus-charset",
                 "application/x-www-form-urlencoded", "")
INTERESTING_INTS = (-(2**63), -1, 0, 1, 2, 3, 16, 2**31, 2**63, 10**30, 10**400)
INTERESTING_FLOATS = (-0.0, 0.5, 1.0, 2.5, 1e308, -1e308, math.inf, -math.inf, math.nan, 5e-324)

text = st.text(st.characters(codec=None), max_size=40) | st.sampled_from(
    ["", "NaN", "Infinity", "yes", "true", "0.5", "16", "\ud800", "\x00", "💥" * 50, "a" * 5000])
numbers = (st.sampled_from(INTERESTING_INTS) | st.sampled_from(INTERESTING_FLOATS)
           | st.integers(-100, 100) | st.floats())
scalars = st.none() | st.booleans() | numbers | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                      max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | values},
                                          optional={"content": text | values}), max_size=3) | values


@st.composite
def object_body(draw: st.DrawFn) -> dict[str, Any]:
    """A mostly valid request with some fields replaced by anything."""
    chat = draw(st.booleans())
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": draw(st.integers(1, 4))}
    if chat:
        body["messages"] = [{"role": "user", "content": draw(text)}]
    else:
        body["prompt"] = draw(text.filter(bool) | st.just("hello"))
    body["stream"] = draw(st.booleans())
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if field == "messages":
            body[field] = draw(messages)
        elif field in ("max_tokens", "max_completion_tokens"):
            body[field] = draw(st.sampled_from(INTERESTING_INTS) | values)
        else:
            body[field] = draw(values)
    body["_path"] = PATHS[chat]
    return body


def _encode(body: Any) -> bytes:
    # allow_nan: Python's json.loads (the router's) reads NaN and Infinity; surrogates are escaped.
    return json.dumps(body, allow_nan=True).encode()


@dataclass(frozen=True)
class Case:
    path: str
    body: bytes
    content_type: str


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(["object", "object", "object", "object", "value", "broken", "nested", "huge"]))
    path = draw(st.sampled_from(PATHS))
    ctype = draw(st.sampled_from(CONTENT_TYPES[:1] * 6 + CONTENT_TYPES))
    if kind == "object":
        body = draw(object_body())
        path = body.pop("_path")
        raw = _encode(body)
    elif kind == "value":
        raw = _encode(draw(values))
    elif kind == "broken":
        good = _encode(draw(object_body()))
        cut = draw(st.integers(0, len(good)))
        raw = good[:cut] + draw(st.binary(max_size=20))
    elif kind == "nested":
        depth = draw(st.sampled_from([10, 500, 5000, 50_000]))
        raw = b'{"model": "sim-model", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    else:
        size = draw(st.sampled_from([100_000, 2_000_000, 40_000_000]))
        raw = b'{"model": "sim-model", "max_tokens": 1, "prompt": "' + b"x" * size + b'"}'
    return Case(path, raw, ctype)


@dataclass(frozen=True)
class Outcome:
    status: int        # 0: no answer (a hang past the timeout, or the connection dropped)
    problem: str       # empty when the answer is acceptable


def send(host: str, port: int, case: Case, timeout_s: float = 30.0, api_key: str | None = None) -> Outcome:
    """Post one case and judge the answer: a 200 (its whole body read) or a 4xx with an OpenAI-style
    error object; anything else (5xx, a non-JSON 4xx, no answer) is a problem."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request("POST", case.path, body=case.body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as e:
        return Outcome(0, f"no answer: {type(e).__name__}: {e}")
    finally:
        conn.close()
    if resp.status == 200:
        return Outcome(200, "")
    if 400 <= resp.status < 500:
        try:
            error = json.loads(data)["error"]
            ok = isinstance(error, dict) and isinstance(error.get("message"), str)
        except (ValueError, KeyError, TypeError):
            ok = False
        return Outcome(resp.status, "" if ok else f"{resp.status} without an OpenAI error body: {data[:200]!r}")
    return Outcome(resp.status, f"{resp.status}: {data[:200]!r}")
