"""Holding requests while a pool wakes from zero (kvpilot.router.wake): bounded, exported per pool
role for the autoscaler, released once every pool a request needs has a live instance, and an
explicit 429 or 503 (with Retry-After) past the bound or the deadline."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from kvpilot.names import COLD_HELD
from kvpilot.openai_errors import ApiError
from kvpilot.router.wake import ColdBook, ColdStarts, needs_wake


def test_the_book_is_bounded_per_model_and_frees_slots() -> None:
    book = ColdBook(max_held=2)
    assert book.admit("a") and book.admit("a") and not book.admit("a")
    assert book.admit("b")                          # another model has its own bound
    book.release("a")
    assert book.count("a") == 1 and book.admit("a")
    book.release("b")
    assert book.count("b") == 0 and "b" not in book.held


def test_only_a_pool_without_any_instance_needs_a_wake() -> None:
    assert needs_wake([0]) and needs_wake([2, 0])   # P/D: decode at zero still needs waking
    assert not needs_wake([1]) and not needs_wake([1, 3])


def held(registry: CollectorRegistry, role: str) -> float | None:
    return registry.get_sample_value(COLD_HELD, {"model": "m", "role": role})


def test_a_held_request_counts_for_both_pools_and_leaves_once_both_answer() -> None:
    registry = CollectorRegistry()
    cold = ColdStarts(registry, max_held=4, deadline_s=60, poll_s=0.001)
    pools: list[list[str]] = [[], []]
    live: set[str] = set()
    seen: list[tuple[float | None, float | None]] = []

    async def probe(url: str) -> bool:
        return url in live

    async def main() -> None:
        task = asyncio.create_task(cold.hold("m", ["prefill", "decode"], lambda: pools, probe))
        await asyncio.sleep(0.01)
        seen.append((held(registry, "prefill"), held(registry, "decode")))
        pools[0].append("http://p0")
        live.add("http://p0")
        pools[1].append("http://d0")             # in the pool (kwok-style Ready) but not answering yet
        await asyncio.sleep(0.01)
        assert not task.done()
        live.add("http://d0")
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert seen == [(1.0, 1.0)]
    assert (held(registry, "prefill"), held(registry, "decode")) == (0.0, 0.0)


def test_past_the_bound_429_and_past_the_deadline_503_both_with_retry_after() -> None:
    registry = CollectorRegistry()
    cold = ColdStarts(registry, max_held=1, deadline_s=0.05, poll_s=0.001)

    async def never(url: str) -> bool:
        return False

    async def main() -> list[ApiError]:
        first = asyncio.create_task(cold.hold("m", ["main"], lambda: [[]], never))
        await asyncio.sleep(0)
        errors = []
        for coro in (cold.hold("m", ["main"], lambda: [[]], never), first):
            with pytest.raises(ApiError) as info:
                await coro
            errors.append(info.value)
        return errors

    full, late = asyncio.run(main())
    assert full.status == 429 and full.type == "rate_limit_exceeded" and full.retry_after
    assert late.status == 503 and late.type == "service_unavailable" and late.retry_after
    assert "from zero" in late.message and held(registry, "main") == 0.0


def test_a_client_that_goes_away_frees_its_slot() -> None:
    registry = CollectorRegistry()
    cold = ColdStarts(registry, max_held=1, deadline_s=60, poll_s=0.001)

    async def never(url: str) -> bool:
        return False

    async def main() -> None:
        task = asyncio.create_task(cold.hold("m", ["main"], lambda: [[]], never))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cold.book.count("m") == 0 and held(registry, "main") == 0.0
