"""The shared virtual-time step loop: a newcomer cuts a multi-step decode plan, and the cut
plan's old event never fires."""

from __future__ import annotations

import itertools

from kvpilot.sim.engine import Engine
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.sequence import Sequence
from kvpilot.sim.stepping import STEP, StepLoop


def _run(second_at: float | None) -> tuple[list[tuple[float, int]], float, int]:
    """Engine 0 runs one long request; another may join at `second_at`. Returns the (time,
    engine) of every live event, the second request's first-token time and the long one's tokens."""
    loop = StepLoop()
    engine = Engine(get_profile("h100-qwen2.5-0.5b"))
    i = loop.add(engine)
    long = Sequence("long", 0.0, 64, [], 200)
    engine.add(long)
    loop.start(i, 0.0)
    late = Sequence("late", second_at or 0.0, 64, [], 2)
    fired: list[tuple[float, int]] = []
    pending = second_at
    while loop:
        until = pending if pending is not None else float("inf")
        for t, kind, idx in loop.due(until):
            assert kind == STEP
            fired.append((t, idx))
            plan = loop.clocks[idx].plan
            assert plan is not None
            engine.commit(plan, t)
            loop.start(idx, t)
        if pending is not None:
            engine.add(late)
            loop.wake(i, pending)
            pending = None
    return fired, late.first_token_time or -1.0, long.output


def test_a_newcomer_cuts_the_decode_plan_and_the_stale_event_is_skipped() -> None:
    alone, _, tokens = _run(None)
    assert len(alone) <= 3 and tokens == 200   # prefill, then the whole decode run as one or two plans
    joined, first, tokens = _run(0.2)
    step = get_profile("h100-qwen2.5-0.5b").step_s
    assert 0.2 < first < 0.2 + 4 * step        # joined after the step in flight, not after the long plan
    # The cut plan's own end is skipped: committing it as well would decode past the 200 tokens
    # or go back in time.
    assert tokens == 200
    assert all(t2 >= t1 for (t1, _), (t2, _) in itertools.pairwise(joined))
