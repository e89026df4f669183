"""The prompt of a request, as a Ray Serve request router sees it.

A router only sees the arguments of the `DeploymentHandle` call (`PendingRequest.args/kwargs`),
not the HTTP body, so an ingress passes the prompt as a plain argument: a string, a dict with
`prompt` or `messages`, or an object with those attributes (OpenAI request models, as Ray Serve
LLM passes them). Chats are keyed by their rendered text, as the engine renders them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvpilot.tokens import render_chat


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """What an ingress hands the engine deployment: the prompt as an attribute, the form every
    router reads (kvpilot's and Ray Serve LLM's `PrefixCacheAffinityRouter`, which looks for a
    `.prompt` or `.messages` attribute on a positional argument, as on OpenAI request models)."""

    prompt: str
    max_tokens: int = 16


def _messages_text(messages: list[Any]) -> str:
    if all(isinstance(m, dict) for m in messages):
        return render_chat(messages)
    return "".join(str(getattr(m, "content", m)) for m in messages)


def _from_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        prompt, messages = value.get("prompt"), value.get("messages")
    else:
        prompt, messages = getattr(value, "prompt", None), getattr(value, "messages", None)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(messages, list) and messages:
        return _messages_text(messages)
    return None


def extract_prompt(args: Iterable[Any], kwargs: Mapping[str, Any]) -> str | None:
    """The first prompt found in a handle call's arguments (`prompt=` first), or None."""
    named = kwargs.get("prompt")
    if isinstance(named, str):
        return named
    for value in [*args, *kwargs.values()]:
        found = _from_value(value)
        if found is not None:
            return found
    return None
