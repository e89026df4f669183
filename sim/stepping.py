"""Engines stepping in virtual time on one event heap: the loop shared by the fixed-size cluster
(`sim.cluster`) and the elastic one (`sim.elastic`).

An engine's step plan may cover many decode steps at once, which is exact while its batch does
not change; a newcomer cuts the plan at the step in flight and joins after it. Every plan an
engine is given bumps its version, so the heap entry of a plan that was cut is skipped when it
comes up. Other events (a replica becoming ready, a planner tick) share the heap, by kind.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

from kvpilot.sim.engine import Engine
from kvpilot.sim.sequence import StepPlan

MAX_DECODE_STEPS = 1 << 20  # a plan may cover this many decode steps
STEP = 0                    # the event kind of a finished plan; callers number their own from 1


@dataclass(slots=True)
class EngineClock:
    engine: Engine
    plan: StepPlan | None = None
    end: float = 0.0
    version: int = 0


class StepLoop:
    def __init__(self) -> None:
        self.clocks: list[EngineClock] = []
        self._heap: list[tuple[float, int, int, int, int]] = []  # (time, order, kind, engine, version)
        self._order = 0

    def add(self, engine: Engine) -> int:
        self.clocks.append(EngineClock(engine))
        return len(self.clocks) - 1

    def push(self, t: float, kind: int, index: int = -1, version: int = 0) -> None:
        self._order += 1
        heapq.heappush(self._heap, (t, self._order, kind, index, version))

    def start(self, i: int, t: float) -> StepPlan | None:
        """Give engine `i` its next plan from `t` (None: it has nothing to run)."""
        c = self.clocks[i]
        c.plan = plan = c.engine.schedule(t, MAX_DECODE_STEPS)
        if plan is not None:
            c.end = t + plan.duration()
            c.version += 1
            self.push(c.end, STEP, i, c.version)
        return plan

    def wake(self, i: int, t: float) -> None:
        """Engine `i` was given a request at `t`: start it if idle, else cut its multi-step plan at
        the step in flight so the request joins after that step."""
        c = self.clocks[i]
        if c.plan is None:
            self.start(i, t)
        elif c.plan.steps > 1 and c.end > t:
            c.engine.truncate(c.plan, t)
            c.end = c.plan.start + c.plan.duration()
            c.version += 1
            self.push(c.end, STEP, i, c.version)

    def due(self, until: float) -> Iterator[tuple[float, int, int]]:
        """Pop (time, kind, engine) for every live event at or before `until`, in order; events
        pushed while iterating are seen too."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            t, _, kind, i, version = heapq.heappop(heap)
            if kind != STEP or version == self.clocks[i].version:
                yield t, kind, i

    def __bool__(self) -> bool:
        return bool(self._heap)
