"""Scale to zero and back, the planner's part: an idle pool with minReplicas 0 goes to zero only
after its stabilisation window, a pool at zero wakes on held requests, P and D wake together, and
a woken pool gets a full window before it may return to zero."""

from __future__ import annotations

from kvpilot.autoscaler.planner import PlannerConfig, PoolPlanner, PoolSignals, wake_plan, wake_together

CFG = PlannerConfig(min_replicas=0, max_replicas=4, scale_down_window_s=60)


def idle(t: float, current: int = 1) -> PoolSignals:
    return PoolSignals(t, current, current, 0.0, 0.0, None, None, None, 0.0, 0.0)


def test_an_idle_pool_with_min_zero_goes_to_zero_only_after_its_window() -> None:
    p = PoolPlanner("aggregated", CFG)
    plans = [p.plan(idle(t)) for t in range(0, 70, 10)]
    assert [x.desired for x in plans[:6]] == [1] * 6        # not yet a full window of evidence
    assert plans[6].desired == 0 and "scale down" in plans[6].reason
    with_floor = PoolPlanner("aggregated", PlannerConfig(min_replicas=1, scale_down_window_s=60))
    assert all(with_floor.plan(idle(t)).desired == 1 for t in range(0, 200, 10))


def test_a_pool_at_zero_wakes_on_held_requests_only() -> None:
    woke = wake_plan(0, 3, CFG)
    assert woke is not None and woke.desired == 1 and "wake from zero" in woke.reason and "3 request" in woke.reason
    assert wake_plan(0, 0, CFG) is None                     # nothing held: stays at zero
    assert wake_plan(2, 3, CFG) is None                     # not at zero: the planner decides
    assert wake_plan(0, 1, PlannerConfig(min_replicas=0, max_replicas=0)) is None   # capped at zero
    floor = wake_plan(0, 1, PlannerConfig(min_replicas=2, max_replicas=4))
    assert floor is not None and floor.desired == 2         # wakes to its minReplicas


def test_p_and_d_wake_together() -> None:
    cfgs = {"prefill": CFG, "decode": CFG}
    assert wake_together({"prefill": 0, "decode": 0}, {"prefill": 1, "decode": 0}, cfgs) == {"decode": 1}
    assert wake_together({"prefill": 0, "decode": 0}, {"prefill": 0, "decode": 0}, cfgs) == {}
    assert wake_together({"prefill": 0, "decode": 0}, {"prefill": 1, "decode": 1}, cfgs) == {}
    # A running pool that scales up is not a wake: its idle sibling at zero stays there.
    assert wake_together({"prefill": 1, "decode": 0}, {"prefill": 2, "decode": 0}, cfgs) == {}
    capped = {"prefill": CFG, "decode": PlannerConfig(min_replicas=0, max_replicas=0)}
    assert wake_together({"prefill": 0, "decode": 0}, {"prefill": 1, "decode": 0}, capped) == {}


def test_a_woken_pool_gets_a_full_window_before_it_may_return_to_zero() -> None:
    p = PoolPlanner("aggregated", CFG)
    for t in range(0, 70, 10):
        last = p.plan(idle(t))
    assert last.desired == 0
    p.woke()                          # a request woke it; served between two intervals, the pool is idle again
    after = [p.plan(idle(t)).desired for t in range(510, 570, 10)]
    assert after == [1] * 6            # a full window from its first interval with metrics, however late
    assert p.plan(idle(570.0)).desired == 0
