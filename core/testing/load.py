"""Prefill-heavy load for scaling tests: long prompts that no prefix cache can serve."""

from __future__ import annotations

import json
import urllib.request
import uuid

LONG_PROMPT = "word " * 8000  # ≈ 10k tokens at 4 bytes a token: 0.3 s of prefill on the modelled H100


def uncacheable_completion(url: str, model: str, max_tokens: int = 8) -> None:
    """One completion with a unique head, so the prefix cache cannot serve it. A failed request
    (a worker retired mid-request is part of scaling) is dropped: the load just goes on."""
    body = json.dumps({"model": model, "prompt": uuid.uuid4().hex + LONG_PROMPT, "max_tokens": max_tokens})
    req = urllib.request.Request(url + "/v1/completions", body.encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
    except OSError:
        pass
