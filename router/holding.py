"""Router-side per-instance queues with late binding and hotspot rebalancing (DualMap §queues).

A request routed to an instance waits here, not in the engine, until the instance has room to
start its prefill (its dispatched-but-not-prefilled work is under `release_tokens`). Each queue
is ordered by the request's expected prefill work there (a cache hit shortens it), then arrival;
a request that has waited `max_wait_s` goes first regardless, so nothing starves. While it
waits a request can still move:

- rebalancing: when an instance's predicted backlog passes θ × SLO, requests at the tail of its
  queue move to their other candidate whenever that lowers their predicted TTFT and the other
  candidate is not itself past the threshold; so does its oldest request once it has waited
  θ × SLO;
- late binding to an idle instance: an instance with nothing in flight and nothing queued takes
  the held request whose predicted TTFT it lowers most, from a queue where it is that request's
  other candidate, or from any queue when that request's wait at home is already past θ × SLO.

Nothing is lost or duplicated: every held request is in exactly one queue until it is released.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kvpilot.router.estimate import LoadEstimator
from kvpilot.router.policy import RequestView


@dataclass(slots=True)
class Held:
    request: RequestView
    home: str                 # the instance whose queue holds it
    other: str                # its other candidate
    reason: str
    uncached: int             # estimated prefill work at `home` (token-equivalents)
    order: int = field(default=0, compare=False)   # arrival order, the tie-breaker
    queued: bool = field(default=False, compare=False)  # in a queue now (its `home`'s)


def _key(held: Held) -> tuple[int, int]:
    return held.uncached, held.order


class HoldQueues:
    def __init__(self, estimate: LoadEstimator, limit_s: Callable[[], float], release_tokens: int = 8192, *,
                 max_wait_s: Callable[[], float] | None = None, steal: bool = True) -> None:
        self.estimate = estimate
        self.limit_s = limit_s            # θ × SLO, read when needed (the SLO may change)
        self.max_wait_s = max_wait_s      # starvation bound; None: pure shortest-work-first
        self.release_tokens = release_tokens
        self.steal = steal
        self.queues: dict[str, list[Held]] = {}
        # Each queue's work in queue order, so a decision's predicted wait is a bisect and a C-level
        # sum instead of a Python walk over a long queue (the proxy's hot path under overload).
        self.works: dict[str, list[int]] = {}
        self.active: set[str] = set()     # instances whose queue is not empty
        # Each queue's requests by arrival order, with lazy deletion (an entry whose request left
        # the queue is dropped when it comes up): the oldest in O(log n), not a scan per event.
        self._by_age: dict[str, list[tuple[int, int, Held]]] = {}
        self._pushes = 0                  # tie-breaker there: one request may be pushed twice to a queue
        self._others: Counter[str] = Counter()  # held requests by their other candidate (late binding's reach)
        self.rank: dict[str, int] = {}    # each queue's position in `self.queues`
        self.queued_tokens: dict[str, int] = {}
        self.held = 0                     # requests in all queues together
        self.moves = 0
        self.steals = 0
        self.clock = 0.0                  # latest arrival seen: the router's notion of now
        self._order = 0

    def __len__(self) -> int:
        return self.held

    def waiting_tokens(self, name: str) -> int:
        return self.queued_tokens.get(name, 0)

    def push(self, held: Held) -> None:
        if held.order == 0:
            self._order += 1
            held.order = self._order
            self.clock = max(self.clock, held.request.arrival)
        queue = self.queues.get(held.home)
        if queue is None:
            queue = self.queues[held.home] = []
            self.rank[held.home] = len(self.rank)
        i = bisect.bisect_right(queue, _key(held), key=_key)
        queue.insert(i, held)
        self.works.setdefault(held.home, []).insert(i, held.uncached)
        self._pushes += 1
        heapq.heappush(self._by_age.setdefault(held.home, []), (held.order, self._pushes, held))
        held.queued = True
        self._others[held.other] += 1
        self.active.add(held.home)
        self.held += 1
        self.queued_tokens[held.home] = self.queued_tokens.get(held.home, 0) + held.uncached

    def advance(self, now: float) -> None:
        """Move the router's clock on between arrivals (the live proxy's periodic tick), so the
        starvation bound and the waited-too-long trigger also fire when no one new arrives."""
        self.clock = max(self.clock, now)

    def drop(self, unwanted: Callable[[Held], bool]) -> list[Held]:
        """Take every held request for which `unwanted` is true off its queue (a client gone, an
        instance gone); returns them, still in no queue, for the caller to forget or re-route."""
        out: list[Held] = []
        for queue in self.queues.values():
            for i in range(len(queue) - 1, -1, -1):
                if unwanted(queue[i]):
                    out.append(self._remove(queue, i))
        return out

    def depths(self) -> dict[str, int]:
        return {name: len(queue) for name, queue in self.queues.items()}

    def _remove(self, queue: list[Held], i: int) -> Held:
        held = queue.pop(i)
        held.queued = False
        self._others[held.other] -= 1
        del self.works[held.home][i]
        if not queue:
            self.active.discard(held.home)
            self._by_age[held.home].clear()   # every entry left is for a request gone from it
        self.held -= 1
        self.queued_tokens[held.home] -= held.uncached
        return held

    def predicted_wait(self, name: str, extra: int = 0) -> float:
        est = self.estimate
        return est.token_s[name] * (est.ahead(name) + self.queued_tokens.get(name, 0) + extra)

    def wait_for(self, name: str, work: int) -> float:
        """Predicted TTFT at `name` of a request of `work` token-equivalents joining its queue now:
        the backlog in flight, the queued requests that would start before it (less work), its own."""
        est = self.estimate
        ahead = est.ahead(name) + work
        works = self.works.get(name)
        if works:
            ahead += sum(works[: bisect.bisect_right(works, work)])
        return est.token_s[name] * ahead

    def rebalance(self) -> None:
        """Move tail requests off instances whose predicted wait exceeds the limit."""
        if not self.held:
            return
        limit = self.limit_s()
        if not any(self.predicted_wait(n) > limit or self._waited(n) > limit for n in self.active):
            return   # no trigger anywhere: the walk below would move nothing (cheap at 1,000 instances)
        for name, queue in list(self.queues.items()):
            moved_any = True
            while queue and moved_any and self.predicted_wait(name) > limit:
                moved_any = False
                held = queue[-1]
                here = self.predicted_wait(name)  # the tail waits for everything ahead of it
                uncached_there = self.estimate.uncached(held.other, held.request)
                there = self.wait_for(held.other, uncached_there)
                if there < here and self.predicted_wait(held.other) <= limit:
                    self._remove(queue, len(queue) - 1)
                    held.home, held.other = held.other, held.home
                    held.uncached, held.reason = uncached_there, "rebalance"
                    self.push(held)
                    self.moves += 1
                    moved_any = True
            if queue:
                self._move_oldest(name, queue, limit)

    def _oldest(self, name: str) -> int:
        """Index in `name`'s (non-empty) queue of its longest-queued request (the earliest pushed)."""
        heap = self._by_age[name]
        while not (heap[0][2].queued and heap[0][2].home == name):
            heapq.heappop(heap)   # it left this queue since
        held = heap[0][2]
        return bisect.bisect_left(self.queues[name], _key(held), key=_key)

    def _waited(self, name: str) -> float:
        """How long the longest-queued request of `name`'s queue has waited by the clock."""
        return self.clock - self.queues[name][self._oldest(name)].request.arrival

    def _move_oldest(self, name: str, queue: list[Held], limit: float) -> None:
        """The other trigger: a request that has already waited θ·SLO moves to its other candidate
        when it would start sooner there (even if this instance's total backlog looks fine)."""
        i = self._oldest(name)
        held = queue[i]
        if self.clock - held.request.arrival <= limit:
            return
        est = self.estimate
        here = est.token_s[name] * (est.ahead(name) + sum(h.uncached for h in queue[: i + 1]))
        work = est.uncached(held.other, held.request)
        if self.wait_for(held.other, work) < here and self.predicted_wait(held.other) <= limit:
            self._remove(queue, i)
            held.home, held.other = held.other, held.home
            held.uncached, held.reason = work, "rebalance"
            self.push(held)
            self.moves += 1

    def _next(self, name: str, queue: list[Held]) -> int:
        """Index of the request to start next: the least work, unless someone has waited too long."""
        if self.max_wait_s is not None:
            oldest = self._oldest(name)
            if self.clock - queue[oldest].request.arrival >= self.max_wait_s():
                return oldest
        return 0

    def _steal_for(self, name: str, kv_room: Callable[[str, Held], bool] | None,
                   queues: list[tuple[str, list[Held]]]) -> Held | None:
        """The held request whose predicted TTFT an idle `name` lowers most, taken off its queue
        (`queues`: the non-empty queues, in `self.queues` order)."""
        est = self.estimate
        limit = self.limit_s()
        best: tuple[float, str, int, int] | None = None   # (gain, home, index, work here)
        for home, queue in queues:
            if home == name or not queue:
                continue
            ahead = est.ahead(home)
            rate_home = est.token_s[home]
            for i, held in enumerate(queue):
                ahead += held.uncached
                wait_home = rate_home * ahead
                if held.other != name and wait_home <= limit:
                    continue  # off its candidates only when it would wait past θ·SLO at home
                if kv_room is not None and not kv_room(name, held):
                    continue
                work = est.uncached(name, held.request)
                gain = wait_home - est.token_s[name] * (est.ahead(name) + work)
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, home, i, work)
        if best is None:
            return None
        _, home, i, work = best
        held = self._remove(self.queues[home], i)
        held.reason = "rebalance" if held.other == name else "steal"
        held.home, held.other = name, home
        held.uncached = work
        self.steals += 1
        return held

    def release(self, kv_room: Callable[[str, Held], bool] | None = None,
                names: Iterable[str] | None = None) -> list[Held]:
        """Requests whose instance can start them now, in queue order; idle instances with an
        empty queue take over waiting requests from elsewhere (late binding). `kv_room` says
        whether an instance's KV cache has room for a request's prompt (the release budget):
        past it a request waits here rather than in an engine that would have to preempt.
        `names`: the instances that may take requests now (default: every one ever tracked); given
        as a name → position mapping, only the instances that can act are visited (same result)."""
        out: list[Held] = []
        if not self.held:
            return out
        backlog = self.estimate.backlog
        rank = self.rank   # in `self.queues` order, which breaks ties between equal gains
        nonempty = [(home, self.queues[home]) for home in sorted(self.active, key=rank.__getitem__)]
        for name in self._visit(names, nonempty):
            if not self.held:
                break   # nothing left to release or take over
            queue = self.queues.get(name)
            peers = self.estimate.external(name)   # other router replicas' work waiting there
            while queue and (backlog[name] + peers == 0
                             or backlog[name] + peers + queue[0].uncached <= self.release_tokens):
                nxt = self._next(name, queue)
                if kv_room is not None and not kv_room(name, queue[nxt]):
                    break
                held = self._remove(queue, nxt)
                backlog[name] += held.uncached  # reserved now; the driver's on_dispatch records it for real
                out.append(held)
            if self.steal and backlog[name] + peers == 0 and not queue:
                stolen = self._steal_for(name, kv_room, nonempty)
                if stolen is not None:
                    backlog[name] += stolen.uncached
                    out.append(stolen)
        for held in out:
            backlog[held.home] -= held.uncached
        return out

    def _visit(self, names: Iterable[str] | None, nonempty: list[tuple[str, list[Held]]]) -> list[str]:
        """The instances `release` must visit, in order. Only two kinds can act: one with a queue,
        and an idle one taking a request over, which it may only do for a request it is the other
        candidate of, unless that request's wait at home is past the limit. While no instance's
        whole predicted wait is past it, none can get there during the visit (a release moves work
        from an instance's queue to its own backlog, a takeover off a queue), so at 1,000
        instances a release looks at a few of them instead of all."""
        if not isinstance(names, Mapping):
            return list(self.estimate.backlog if names is None else names)
        limit = self.limit_s()
        if any(self.predicted_wait(home) > limit for home, _ in nonempty):
            return list(names)
        relevant = {home for home, _ in nonempty}
        if self.steal:
            relevant.update(name for name, n in self._others.items() if n > 0)
        return sorted((n for n in relevant if n in names), key=names.__getitem__)
