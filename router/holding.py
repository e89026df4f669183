"""Router-side per-instance queues with late binding and hotspot rebalancing (DualMap §queues).

A request routed to an instance waits here, not in the engine, until the instance has room to
start its prefill (its dispatched-but-not-prefilled uncached tokens are under `release_tokens`).
While it waits it can still move: when an instance's predicted backlog passes θ × SLO, requests
at the tail of its queue move to their other candidate whenever that lowers their predicted TTFT
and the other candidate is not itself past the threshold. Nothing is lost or duplicated: every
held request is in exactly one queue until it is released.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvpilot.router.estimate import LoadEstimator
from kvpilot.router.policy import RequestView


@dataclass(slots=True)
class Held:
    request: RequestView
    home: str                 # the instance whose queue holds it
    other: str                # its other candidate
    reason: str
    uncached: int             # estimated uncached tokens at `home`


class HoldQueues:
    def __init__(self, estimate: LoadEstimator, limit_s: Callable[[], float], release_tokens: int = 8192) -> None:
        self.estimate = estimate
        self.limit_s = limit_s            # θ × SLO, read when needed (the SLO may change)
        self.release_tokens = release_tokens
        self.queues: dict[str, deque[Held]] = {}
        self.queued_tokens: dict[str, int] = {}
        self.moves = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def waiting_tokens(self, name: str) -> int:
        return self.queued_tokens.get(name, 0)

    def push(self, held: Held) -> None:
        self.queues.setdefault(held.home, deque()).append(held)
        self.queued_tokens[held.home] = self.queued_tokens.get(held.home, 0) + held.uncached

    def predicted_wait(self, name: str, extra: int = 0) -> float:
        est = self.estimate
        return est.token_s[name] * (est.backlog[name] + self.queued_tokens.get(name, 0) + extra)

    def rebalance(self) -> None:
        """Move tail requests off instances whose predicted wait exceeds the limit."""
        limit = self.limit_s()
        for name, queue in list(self.queues.items()):
            moved_any = True
            while queue and moved_any and self.predicted_wait(name) > limit:
                moved_any = False
                held = queue[-1]
                here = self.predicted_wait(name)  # the tail waits for everything ahead of it
                uncached_there = self.estimate.uncached(held.other, held.request)
                there = self.predicted_wait(held.other, uncached_there)
                if there < here and self.predicted_wait(held.other) <= limit:
                    queue.pop()
                    self.queued_tokens[name] -= held.uncached
                    held.home, held.other = held.other, held.home
                    held.uncached, held.reason = uncached_there, "rebalance"
                    self.push(held)
                    self.moves += 1
                    moved_any = True

    def release(self) -> list[Held]:
        """Requests whose instance can start them now, in queue order."""
        out: list[Held] = []
        backlog = self.estimate.backlog
        for name, queue in self.queues.items():
            while queue and (backlog[name] == 0 or backlog[name] + queue[0].uncached <= self.release_tokens):
                held = queue.popleft()
                self.queued_tokens[name] -= held.uncached
                backlog[name] += held.uncached  # reserved now; the driver's on_dispatch records it for real
                out.append(held)
        for held in out:
            backlog[held.home] -= held.uncached
        return out
