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


def test_release_visiting_only_instances_that_can_act_is_the_full_visit() -> None:
    names = [f"i{k}" for k in range(40)]
    position = {n: k for k, n in enumerate(names)}

    def setup() -> HoldQueues:
        est = LoadEstimator(PolicyContext(), prefill_token_s=1e-5)
        est.track([InstanceLoad(n) for n in names])
        return HoldQueues(est, lambda: 0.5, release_tokens=4000)

    fast, full = setup(), setup()
    rng = random.Random(9)
    released = 0
    for i in range(3000):
        home, other = rng.sample(names, 2)
        work = rng.choice([1, 50, 300, 2000, 9000, 30_000])
        backlog = {n: rng.choice([0, 0, 0, 500, 5000, 60_000]) for n in rng.sample(names, 3)}
        outs = []
        for q, visit in ((fast, position), (full, names)):
            q.push(Held(RequestView(f"r{i}", 100, [], arrival=float(i)), home, other, "affinity", work))
            q.estimate.backlog.update(backlog)
            q.rebalance()
            outs.append([(h.request.request_id, h.home, h.reason) for h in q.release(names=visit)])
        assert outs[0] == outs[1]
        released += len(outs[0])
    assert fast.steals > 0 and fast.moves > 0 and 0 < released < 3000


def test_the_oldest_request_of_each_queue_is_the_scan_s_through_moves_drops_and_releases() -> None:
    """The age index (lazily pruned) answers what a scan of the queue for the earliest push would."""
    est = LoadEstimator(PolicyContext(), prefill_token_s=1e-5)
    est.track([InstanceLoad(n) for n in NAMES])
    q = HoldQueues(est, lambda: 0.5, release_tokens=4000, max_wait_s=lambda: 30.0)
    rng = random.Random(7)
    for i in range(3000):
        home, other = rng.sample(NAMES, 2)
        q.push(Held(RequestView(f"r{i}", 100, [], arrival=float(i) / 10), home, other, "affinity",
                    rng.choice([1, 50, 300, 2000, 9000])))
        if i % 5 == 0:
            q.drop(lambda h: h.order % 7 == 0)
        if i % 3 == 0:
            for name in NAMES:
                est.backlog[name] = rng.choice([0, 0, 5000, 60_000])
            q.rebalance()
            q.release()
        for name, queue in q.queues.items():
            if queue:
                assert q._oldest(name) == min(range(len(queue)), key=lambda k: queue[k].order)
    assert q.moves > 0 and len(q) > 0
