"""Typed models of the OpenAI request bodies the router accepts, checked at its boundary.

Why here and not only in the engine: a field of the wrong type (`"stream": "yes"`, a
`"temperature": "NaN"` string, a non-finite number) would otherwise reach the router's own logic
(`stream` decides how the answer is relayed, `max_tokens` how migration and resume count) or be
coerced silently by an engine. Only the fields the OpenAI API defines are typed; every other field
passes through untouched to the engine (vLLM has many extensions), because the router forwards the
client's own JSON object, not a re-serialised model.

Strict types: a string is never a number or a boolean; an integer is a valid float. Floats must be
finite. The parse is one pydantic-core call on the decoded JSON (a few microseconds; see
bench/router_decision.py).

What is rejected, with a 400 naming the field:
- a list of several prompts, and prompts given as token ids: the router keys a request by its
  prompt text (affinity, holding, migration) and relays one stream per request; send one request
  per prompt, as text;
- `n` (or `best_of`) above 1 where the engine cannot serve it (`kvpilot.router.api`): the simulator
  ignores it, and in disaggregated mode the prefill hop sends one sequence.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from kvpilot.openai_errors import ApiError

# Integers fit in 64 bits (JSON allows any size; engines do not: 10**400 made a 500). Integers are
# valid floats (`"temperature": 1`); floats must be finite (`allow_inf_nan=False`).
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)] | Int64
NonNegative = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)] | Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
Stop = StrictStr | list[StrictStr]


class _Common(BaseModel):
    """Fields both endpoints share. `extra="allow"`: unknown fields are the engine's business."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: Annotated[StrictStr, Field(min_length=1)]
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None
    max_tokens: Count | None = None
    temperature: NonNegative | None = None
    top_p: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    n: Count | None = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    seed: Int64 | None = None
    stop: Stop | None = None
    user: StrictStr | None = None
    logit_bias: dict[str, Finite] | None = None
    # vLLM extensions the router itself reads (resume and migration count with them).
    min_tokens: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=2**31 - 1)] | None = None


class CompletionRequest(_Common):
    """`POST /v1/completions`."""

    prompt: StrictStr | list[Any]
    echo: StrictBool | None = None
    best_of: Count | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    suffix: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Annotated[StrictStr, Field(min_length=1)]
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None


def _loc(loc: tuple[int | str, ...], body: Any) -> str:
    """`("messages", 0, "role")` → `messages[0].role`: the `param` OpenAI's errors carry. Parts that
    are not in the body are pydantic's union-branch tags (`float`, `list[str]`) and are skipped."""
    out, node = "", body
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            out, node = out + f"[{part}]", node[part]
        elif isinstance(part, str) and isinstance(node, dict):
            out, node = (out + "." + part if out else part), node.get(part)
    return out


def validate(body: dict[str, Any], chat: bool) -> CompletionRequest | ChatRequest:
    """`body` checked against the endpoint's model; the first error as a 400 naming its field."""
    try:
        if chat:
            return ChatRequest.model_validate(body)
        req = CompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False, include_context=False, include_input=False)[0]
        param = _loc(tuple(err["loc"]), body) or None
        raise ApiError(400, f"{param or 'body'}: {err['msg']}", param=param) from None
    if isinstance(req.prompt, list):
        if any(isinstance(p, int | list) for p in req.prompt):
            raise ApiError(400, "prompt: prompts as token ids are not supported; send the prompt as text",
                           param="prompt")
        if len(req.prompt) != 1:
            raise ApiError(400, "prompt: a list of prompts is not supported; send one request per prompt",
                           param="prompt")
        if not isinstance(req.prompt[0], str):
            raise ApiError(400, "prompt: must be a string", param="prompt")
    return req


def sequences(req: CompletionRequest | ChatRequest) -> int:
    """How many sequences the engine would generate for the request (`n`, `best_of`)."""
    best_of = req.best_of if isinstance(req, CompletionRequest) else None
    return max(req.n or 1, best_of or 1)
