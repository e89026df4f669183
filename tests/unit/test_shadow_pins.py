"""A shadow cache keeps a running request's blocks, as vLLM does: its block pool evicts only blocks
no running request holds, and returns a finished request's blocks to the free queue as the most
recently used. The shadow (`ShadowCache` with `pin`) must forget exactly what that pool would."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpilot.router.estimate import EXACT, LoadEstimator, ShadowCache
from kvpilot.router.policy import InstanceLoad, PolicyContext, RequestView

pytestmark = pytest.mark.unit


class BlockPool:
    """The reference: vLLM's rule on a plain list, one hash per block (no ladder)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.order: list[int] = []   # least recently used first
        self.pins: Counter[int] = Counter()

    def insert(self, hashes: list[int], pin: bool) -> None:
        for h in reversed(hashes):   # tail first: the head is the most recent
            if h in self.order:
                self.order.remove(h)
            self.order.append(h)
            if pin:
                self.pins[h] += 1
        while len(self.order) > self.capacity:
            free = [h for h in self.order if not self.pins[h]]
            if not free:
                break
            self.order.remove(free[0])

    def unpin(self, hashes: list[int]) -> None:
        for h in reversed(hashes):
            self.pins[h] -= 1
            if not self.pins[h]:
                del self.pins[h]
                if h in self.order:
                    self.order.remove(h)
                    self.order.append(h)


def prompt(convo: int, turns: int, tail: int) -> list[int]:
    """Chained-looking hashes: a conversation's turns extend one another, the tail is unique."""
    return [convo * 1000 + t for t in range(turns)] + [10**6 + tail]


def test_a_running_request_keeps_its_blocks_and_frees_them_when_it_ends() -> None:
    cache = ShadowCache(capacity_blocks=8, dense=EXACT)
    running = prompt(1, 3, 0)
    cache.insert(running, pin=True)
    for i in range(10):   # ten other prompts churn the cache through three times
        cache.insert(prompt(100 + i, 2, i + 1))
    assert cache.match(running) == len(running)
    cache.unpin(running)
    for i in range(4):
        cache.insert(prompt(200 + i, 2, 20 + i))
    assert cache.match(running) == 0
    assert cache.size <= cache.capacity


def test_unpinned_blocks_come_back_as_the_most_recent() -> None:
    cache = ShadowCache(capacity_blocks=6, dense=EXACT)
    long_running = prompt(1, 2, 0)
    cache.insert(long_running, pin=True)
    cache.insert(prompt(2, 2, 1))
    cache.unpin(long_running)                # ended after the second prompt was sent
    cache.insert(prompt(3, 2, 2))            # 9 blocks: the three least recent go
    assert cache.match(long_running) == len(long_running)
    assert cache.match(prompt(2, 2, 1)) == 0


def test_when_every_block_is_pinned_nothing_is_dropped() -> None:
    cache = ShadowCache(capacity_blocks=4, dense=EXACT)
    a, b = prompt(1, 2, 0), prompt(2, 2, 1)
    cache.insert(a, pin=True)
    cache.insert(b, pin=True)
    assert cache.match(a) == len(a) and cache.match(b) == len(b)
    assert cache.size == 6   # over capacity: the engine would preempt, not evict


operations = st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4), st.integers(0, 3), st.booleans()),
                      min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=operations, capacity=st.integers(2, 20))
def test_the_shadow_forgets_what_the_block_pool_forgets(ops: list[tuple[int, int, int, bool]],
                                                         capacity: int) -> None:
    cache, pool = ShadowCache(capacity, dense=EXACT), BlockPool(capacity)
    running: list[list[int]] = []
    for i, (convo, turns, action, pin) in enumerate(ops):
        if action == 0 and running:          # the oldest running request ends
            ended = running.pop(0)
            cache.unpin(ended)
            pool.unpin(ended)
            continue
        hashes = prompt(convo, turns, i)
        cache.insert(hashes, pin=pin)
        pool.insert(hashes, pin)
        if pin:
            running.append(hashes)
        assert set(cache._blocks) == set(pool.order)
        assert cache.size == len(pool.order)


def view(request_id: str, hashes: list[int], block: int = 16) -> RequestView:
    return RequestView(request_id, len(hashes) * block, hashes, 0.0)


@pytest.mark.parametrize("pin_running", [True, False])
def test_the_estimator_pins_until_the_request_ends_not_its_first_token(pin_running: bool) -> None:
    context = PolicyContext(slo_ttft_s=2.0, block_size=16, kv_capacity_tokens=16 * 8)
    estimate = LoadEstimator(context, shadow_dense=EXACT, pin_running=pin_running)
    estimate.track([InstanceLoad("a")])
    long = view("long", prompt(1, 3, 0))
    estimate.dispatched(long, "a")
    estimate.first_token("long", 0.1)        # prefilled, still decoding: its blocks are in use
    for i in range(6):
        estimate.dispatched(view(f"r{i}", prompt(100 + i, 2, i + 1)), "a")
        estimate.ended(f"r{i}", True)
    held = estimate.cached_tokens("a", long)
    assert held == (len(long.block_hashes) * 16 if pin_running else 0)
    estimate.ended("long", True)
    for i in range(6, 12):
        estimate.dispatched(view(f"r{i}", prompt(100 + i, 2, i + 1)), "a")
        estimate.ended(f"r{i}", True)
    assert estimate.cached_tokens("a", long) == 0
