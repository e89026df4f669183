"""Router-side queues: the predicted wait a decision reads is the queue walk it replaced."""

from __future__ import annotations

import random

from kvpilot.router.estimate import LoadEstimator
from kvpilot.router.holding import Held, HoldQueues
from kvpilot.router.policy import InstanceLoad, PolicyContext, RequestView

NAMES = ["a", "b", "c"]


def walked_wait(q: HoldQueues, name: str, work: int) -> float:
    """The definition: backlog in flight, then every queued request with no more work than this one."""
    ahead = q.estimate.backlog[name] + work
    for held in q.queues.get(name, ()):
        if held.uncached > work:
            break
        ahead += held.uncached
    return q.estimate.token_s[name] * ahead


def test_wait_for_equals_the_queue_walk_through_pushes_moves_and_removals() -> None:
    est = LoadEstimator(PolicyContext(), prefill_token_s=1e-5)
    est.track([InstanceLoad(n) for n in NAMES])
    q = HoldQueues(est, lambda: 0.5, release_tokens=4000)
    rng = random.Random(5)
    for i in range(2000):
        home, other = rng.sample(NAMES, 2)
        view = RequestView(f"r{i}", 100, [], arrival=float(i))
        q.push(Held(view, home, other, "affinity", rng.choice([1, 50, 50, 300, 2000, 9000])))
        if i % 7 == 0:
            q.drop(lambda h: h.order % 5 == 0)
        if i % 11 == 0:
            for name in NAMES:
                est.backlog[name] = rng.randint(0, 20_000)
            q.rebalance()
            q.release()
        for name in NAMES:
            for work in (1, 50, 51, 299, 300, 5000, 10**6):
                assert q.wait_for(name, work) == walked_wait(q, name, work)
            assert q.works.get(name, []) == [h.uncached for h in q.queues.get(name, [])]
    assert q.moves > 0 and len(q) > 0
