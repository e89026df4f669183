"""A holding pool (DualMap) in the live proxy: requests wait in the router, are released late,
can leave the queue when their client goes, and never get lost or dispatched twice."""

from __future__ import annotations

import asyncio

import pytest

from kvpilot.router.config import Endpoint
from kvpilot.router.policies import make_policy
from kvpilot.router.policy import PolicyContext, RequestView
from kvpilot.router.pool import LagGate, NoEndpoint, Pool, QueueFull
from kvpilot.tokens import block_hashes, block_text

PROMPT_TOKENS = 6000   # two of these exceed the release budget (8,192 tokens) of one instance


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(name=f"w{i}", url=f"http://127.0.0.1:{9000 + i}") for i in range(n)]  # type: ignore[arg-type]


def make_pool(n: int = 2, max_queued: int = 64) -> Pool:
    ctx = PolicyContext(slo_ttft_s=60.0, block_size=256)   # a lax SLO: no rebalancing in these tests
    return Pool(endpoints(n), make_policy("dualmap", ctx), max_queued=max_queued)


def req(i: int) -> RequestView:
    """Distinct prompts: no cache hit shrinks their prefill work."""
    return RequestView(f"r{i}", PROMPT_TOKENS, block_hashes(block_text(100 + i, PROMPT_TOKENS), 256), float(i))


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_requests_wait_in_the_router_until_their_instance_can_start_them() -> None:
    pool = make_pool(n=1)
    assert pool.holder is not None
    tasks = [asyncio.create_task(pool.admit(req(i))) for i in range(4)]
    await settle()
    done = [t for t in tasks if t.done()]
    assert len(done) == 1, "only the first fits the release budget of the only instance"
    assert sum(pool.queued().values()) == 3 and len(pool.waiting) == 3
    # First token of each released request releases the next one; nothing is dispatched twice.
    released = [tasks.index(done[0])]
    for _ in range(3):
        i = released[-1]
        member, _ = tasks[i].result()
        pool.first_token(member, req(i), 0.1)
        await settle()
        now_done = [k for k, t in enumerate(tasks) if t.done() and k not in released]
        assert len(now_done) == 1
        released.append(now_done[0])
    assert sorted(released) == [0, 1, 2, 3]
    assert pool.by_name["w0"].load.in_flight == 4 and not pool.waiting and not pool.queued().get("w0")


async def test_a_cancelled_waiter_leaves_the_queue_and_is_never_dispatched() -> None:
    pool = make_pool(n=1, max_queued=1)
    first = await pool.admit(req(0))
    assert first is not None
    waiter = asyncio.create_task(pool.admit(req(1)))
    await settle()
    assert not waiter.done() and pool.queued() == {"w0": 1}
    with pytest.raises(QueueFull):
        await pool.admit(req(2))
    waiter.cancel()
    await settle()
    assert waiter.cancelled() and not pool.waiting and pool.queued() == {"w0": 0}
    later = asyncio.create_task(pool.admit(req(3)))   # the slot is free again
    await settle()
    assert not later.done()
    pool.first_token(first[0], req(0), 0.1)
    await settle()
    assert later.done() and pool.by_name["w0"].load.in_flight == 2   # r0 and r3; r1 never went out


async def test_held_requests_follow_membership_changes() -> None:
    pool = make_pool(n=3)
    tasks = [asyncio.create_task(pool.admit(req(i))) for i in range(6)]
    await settle()
    held = sum(pool.queued().values())
    assert held > 0
    gone = min(name for name, n in pool.queued().items() if n)
    before = {k for k, t in enumerate(tasks) if t.done()}
    pool.set_endpoints([e for e in endpoints(3) if e.name != gone])   # an instance holding some leaves
    await settle()
    assert not pool.queued().get(gone), "nothing may stay queued for an instance that left"
    assert sum(pool.queued().values()) + sum(t.done() for t in tasks) == 6   # none lost, none twice
    answered: set[int] = set()
    while len(answered) < 6:   # first tokens release the rest, none to the instance that left
        k = next(k for k, t in enumerate(tasks) if t.done() and k not in answered)
        answered.add(k)
        member, _ = tasks[k].result()
        assert k in before or member.endpoint.name != gone
        pool.first_token(member, req(k), 0.1)
        await settle()
    assert not pool.waiting and sum(pool.queued().values()) == 0
    tasks = [asyncio.create_task(pool.admit(req(10 + i))) for i in range(6)]
    await settle()
    pool.set_endpoints([])
    await settle()
    assert all(t.done() for t in tasks)
    failed = [t for t in tasks if t.exception() is not None]
    assert failed and all(isinstance(t.exception(), NoEndpoint) for t in failed)


async def test_a_bypassed_pool_sends_its_held_requests_and_routes_new_ones_at_once() -> None:
    pool = make_pool(n=1)
    first = await pool.admit(req(0))
    held = [asyncio.create_task(pool.admit(req(i))) for i in (1, 2)]
    await settle()
    assert first is not None and not any(t.done() for t in held) and pool.queued() == {"w0": 2}
    pool.set_bypass(True)   # the proxy's loop lags: holding would only add delay
    await settle()
    assert all(t.done() for t in held) and not pool.waiting and pool.queued() == {"w0": 0}
    direct = await pool.admit(req(3))
    assert direct is not None and direct[0].endpoint.name == "w0" and pool.queued() == {"w0": 0}
    assert pool.by_name["w0"].load.in_flight == 4, "each request dispatched exactly once"
    pool.set_bypass(False)
    later = asyncio.create_task(pool.admit(req(4)))
    await settle()
    assert not later.done() and pool.queued() == {"w0": 1}, "holding again once the router caught up"


def test_the_lag_gate_opens_on_one_late_tick_and_closes_after_a_calm_spell() -> None:
    gate = LagGate(0.02, calm_ticks=3)
    assert not gate.update(0.019)
    assert gate.update(0.021)
    assert gate.update(0.001) and gate.update(0.001), "two calm ticks are not yet a spell"
    assert gate.update(0.01), "half the threshold is not calm"
    assert gate.update(0.001) and gate.update(0.001)
    assert not gate.update(0.001), "three calm ticks in a row close it"
