"""Generated bad input against a live router in front of one simulator: every answer is a 200 or a
4xx with an OpenAI-style error body, never a 5xx or a hang, and the router outlives it all.
The recorded long run (≥ 10,000 requests) is bench/fuzz_router.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hypothesis import HealthCheck, example, given, settings

from kvpilot.testing.fuzz import Case, cases, send
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker

# Answers once found wrong, kept as fixed examples: a lone surrogate in a prompt or a chat (500s
# from UTF-8 encoding), JSON nested past Python's recursion limit, a charset Python does not know,
# a body over the 32 MiB limit, an integer too large for any engine (from the 10,000-request run).
KNOWN = [Case("/v1/completions", b'{"model": "sim-model", "max_tokens": 1, "prompt": "\\ud800"}', "application/json"),
         Case("/v1/chat/completions", b'{"model": "sim-model", "max_tokens": 1, "stream": true, '
              b'"messages": [{"role": "user", "content": "\\ud800"}]}', "application/json"),
         Case("/v1/completions", b'{"model": "sim-model", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
              "application/json"),
         Case("/v1/completions", b'{"model": "sim-model", "prompt": "hi"}', "application/json; charset=bogus"),
         Case("/v1/completions", b'{"model": "sim-model", "prompt": "' + b"x" * (40 << 20) + b'"}',
              "application/json"),
         Case("/v1/completions", b'{"model": "sim-model", "max_tokens": 1, "prompt": "hi", "presence_penalty": 1'
              + b"0" * 400 + b"}", "application/json")]


def test_generated_requests_get_a_200_or_a_clear_4xx(sim_worker_factory: Callable[..., SimWorker],
                                                     router_factory: Callable[..., RouterProcess]) -> None:
    worker = sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--time-scale", "50")
    router = router_factory([{"name": "sim-model", "endpoints": [{"name": "w0", "url": worker.url}]}])
    seen: Counter[int] = Counter()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases())
    @example(KNOWN[0])
    @example(KNOWN[1])
    @example(KNOWN[2])
    @example(KNOWN[3])
    @example(KNOWN[4])
    @example(KNOWN[5])
    def one(case: Case) -> None:
        outcome = send("127.0.0.1", router.port, case)
        seen[outcome.status] += 1
        assert not outcome.problem, f"{case.path} {case.content_type!r} {case.body[:300]!r}: {outcome.problem}"

    one()
    assert router.proc.alive(), "the router is still running"
    assert router.healthy()
    assert seen[200] > 0 and sum(n for s, n in seen.items() if 400 <= s < 500) > 0, seen
