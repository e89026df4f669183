"""Prefill-heavy load for scaling tests (long prompts that no prefix cache can serve), and what the
autoscaler decided under it."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterable

from kvpilot.procs import wait_for

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


def load_until(urls: Callable[[], Iterable[str]], model: str, stop: threading.Event) -> None:
    """Uncacheable completions, one at a time, round-robin over whatever `urls()` lists now (the
    workers come and go as the pool scales), until `stop` is set."""
    k = 0
    while not stop.is_set():
        now = sorted(urls())
        if now:
            uncacheable_completion(now[k % len(now)], model)
            k += 1
        else:
            stop.wait(0.2)


def autoscaler_decisions(metrics_port: int) -> float:
    """Decisions an autoscaler took (every pool, every action), from its own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kvpilot_autoscaler_decisions_total{"))


def another_decision(metrics_port: int, timeout: float = 30) -> None:
    """Wait until the autoscaler has decided once more than now."""
    seen = autoscaler_decisions(metrics_port)
    wait_for(lambda: autoscaler_decisions(metrics_port) > seen, timeout, "another decision")
