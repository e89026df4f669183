"""Server-sent events as the OpenAI streaming API frames them: `data: {json}` events, a blank line
after each, and `data: [DONE]` at the end. One place for the framing, used by the router, the
simulator, its Ray Serve app and the KV-transfer protocol's handoff event."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(data: Any, name: str | None = None) -> bytes:
    """One event carrying `data` as compact JSON (named `name` when given)."""
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def payload(event: bytes) -> dict[str, Any] | None:
    """The JSON object an unnamed `data: {...}` event carries; None for anything else ([DONE], a
    named event, a comment, malformed JSON)."""
    if not event.startswith(b"data: {"):
        return None
    try:
        data = json.loads(event[6:])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
