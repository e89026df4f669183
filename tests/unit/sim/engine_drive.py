"""One simulator engine driven through timed arrivals in virtual time, for the tests that hold
multi-step plans to single-stepping (test_engine.py, test_engine_shapes.py): both must drive the
engine the same way for the comparison to mean anything."""

from __future__ import annotations

from kvpilot.sim.engine import Engine
from kvpilot.sim.sequence import Sequence


def drive(engine: Engine, arrivals: list[tuple[float, Sequence]], max_steps: int) -> None:
    """Run `engine` until every sequence of `arrivals` ((time, sequence), sorted by time) is done,
    adding each at its time, with plans of at most `max_steps` decode steps; a plan of more than one
    step is cut at the next arrival, as the cluster cuts it."""
    t, pending = 0.0, list(arrivals)
    while pending or engine.has_work:
        if not engine.has_work:
            t = max(t, pending[0][0])
        while pending and pending[0][0] <= t:
            engine.add(pending.pop(0)[1])
        plan = engine.schedule(t, max_steps=max_steps)
        if plan is None:
            continue
        end = t + plan.duration()
        if pending and pending[0][0] < end and plan.steps > 1:
            engine.truncate(plan, pending[0][0])
            end = t + plan.duration()
        t = end
        engine.commit(plan, t)
