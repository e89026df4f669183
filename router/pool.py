"""A pool of endpoints serving one model in one role, with its policy, loads and breakers.

The pool is the bridge between the pure policy (which sees `InstanceLoad`s and returns an
index) and the proxy (which sees URLs and HTTP failures). An endpoint whose breaker is open is
left out of the list the policy sees, so a dead worker's keys move to ring neighbours and come
back when it recovers.

A pool whose policy holds requests (DualMap) keeps them in the policy's router-side queues: the
proxy `admit`s a request and awaits its release, which `pump` hands out after every first token,
completion, membership change and the proxy's periodic tick. Late binding happens there: the
instance is fixed only when the request leaves the queue.

A retry's tried endpoints and a pick that is full are excluded from the decision as a filter:
the policy gets the same member list as every other request (so its rings are not rebuilt) and
the names it must not pick.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvpilot.router.config import Endpoint
from kvpilot.router.policy import Decision, HoldingPolicy, InstanceLoad, Outcome, Policy, RequestView, Status


class QueueFull(Exception):
    """The pool's router-side queue is at its limit: the caller should answer 429."""


class NoEndpoint(Exception):
    """No healthy endpoint to route or release to: the caller should answer 503."""


class LagGate:
    """Whether new requests should skip the router-side queues, from how late the proxy's periodic
    tick runs. Holding pays for better placement with router time; a router that has none (its
    event loop lags) learns of first tokens late, sees every backlog full and only adds delay.
    One late tick starts the bypass; it ends after `calm_ticks` ticks in a row under a quarter of
    the threshold (the lag of a loaded loop swings from tick to tick)."""

    def __init__(self, threshold_s: float, calm_ticks: int = 20) -> None:
        self.threshold_s = threshold_s
        self.calm_ticks = calm_ticks
        self.on = False
        self._calm = 0

    def update(self, lag_s: float) -> bool:
        if lag_s > self.threshold_s:
            self.on, self._calm = True, 0
        elif self.on:
            self._calm = self._calm + 1 if lag_s < self.threshold_s / 4 else 0
            if self._calm >= self.calm_ticks:
                self.on = False
        return self.on


@dataclass(slots=True)
class Breaker:
    failures: int = 0
    open_until: float = 0.0

    def is_open(self, now: float) -> bool:
        return now < self.open_until


@dataclass(slots=True)
class Member:
    endpoint: Endpoint
    load: InstanceLoad
    breaker: Breaker = field(default_factory=Breaker)
    url: str = ""


class Attempt:
    """One dispatch of a request to a member, from the pick to its end. It reports the first token
    at most once and ends exactly once, so the pool's counters and the policy's feedback stay
    balanced whichever way the request leaves (success, upstream error, 4xx, client gone).
    `status` starts as "cancelled": an attempt that ends without being told otherwise was cut off."""

    __slots__ = ("_reported", "member", "pool", "prefilled", "request", "status")

    def __init__(self, pool: Pool, member: Member, request: RequestView) -> None:
        self.pool, self.member, self.request = pool, member, request
        self.status: Status = "cancelled"
        self.prefilled = False
        self._reported = False

    def first_token(self, ttft_s: float | None) -> None:
        """The instance answered its first token (`ttft_s` when observed: streaming)."""
        if not self._reported:
            self._reported, self.prefilled = True, True
            self.pool.first_token(self.member, self.request, ttft_s)

    def end(self) -> None:
        if not self._reported:
            self._reported = True
            self.pool.first_token(self.member, self.request, None)
        self.pool.finish(self.member, self.request, Outcome(self.member.endpoint.name, self.status, self.prefilled))


class Pool:
    def __init__(self, endpoints: list[Endpoint], policy: Policy, *, breaker_failures: int = 3,
                 breaker_cooldown_s: float = 10.0, max_inflight: int = 256, hold: bool = True,
                 max_queued: int = 1024) -> None:
        self.policy = policy
        self.holder: HoldingPolicy | None = policy if hold and isinstance(policy, HoldingPolicy) else None
        self.max_queued = max_queued
        self.waiting: dict[str, asyncio.Future[tuple[Member, str]]] = {}   # held request id → its release
        self.bypass = False   # set by the proxy while it lags: new requests are routed at once, not held
        self.on_queued: Callable[[], None] | None = None     # called when a request has to wait (a metric)
        self.members: list[Member] = []
        self.by_name: dict[str, Member] = {}
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.max_inflight = max_inflight
        self._healthy: list[Member] | None = None
        self._healthy_loads: list[InstanceLoad] = []
        self._healthy_until = 0.0
        # Called with (joined, left) after a membership change (the router's scale-event handover).
        self.on_change: Callable[[list[Member], list[Member]], None] | None = None
        self.set_endpoints(endpoints)

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        """Replace the membership (discovery); members that stay keep their load and breaker."""
        old = self.by_name
        members = []
        for e in endpoints:
            m = old.get(e.name) or Member(e, InstanceLoad(e.name))
            m.endpoint, m.url = e, str(e.url).rstrip("/")  # same pod name may come back with a new IP
            members.append(m)
        self.members = members
        self.by_name = {m.endpoint.name: m for m in self.members}
        self._healthy = None
        if self.on_change is not None:
            joined = [m for m in members if m.endpoint.name not in old]
            left = [m for name, m in old.items() if name not in self.by_name]
            if joined or left:
                self.on_change(joined, left)
        if self.waiting:
            self.pump()

    def healthy(self) -> list[Member]:
        """Members whose breaker is closed: the membership the policy sees. The same list object
        is returned until a breaker opens or closes, so policies can skip re-syncing their rings."""
        now = time.monotonic()
        if self._healthy is None or now >= self._healthy_until:
            self._healthy = [m for m in self.members if not m.breaker.is_open(now)]
            self._healthy_loads = [m.load for m in self._healthy]
            self._healthy_until = min((m.breaker.open_until for m in self.members if m.breaker.open_until > now),
                                      default=math.inf)
        return self._healthy

    def saturated(self) -> bool:
        """Every healthy endpoint is at its in-flight limit: the caller should shed load (429)."""
        live = self.healthy()
        return bool(live) and all(m.load.in_flight >= self.max_inflight for m in live)

    def choose(self, request: RequestView, exclude: frozenset[str] = frozenset()) -> tuple[Member, Decision] | None:
        """Route now, skipping `exclude` (a retry's tried endpoints) and endpoints at their limit.
        None: no endpoint is left to take it."""
        members = self.healthy()
        loads = self._healthy_loads
        limit = self.max_inflight
        for m in members:   # (a loop, not any() over a generator: it ends at the first member with room)
            if m.load.in_flight < limit and (not exclude or m.endpoint.name not in exclude):
                break
        else:
            return None
        decision = self.policy.route(request, loads, exclude)
        if members[decision.index].load.in_flight >= limit:
            # The policy's pick is full: choose again among those with room (the rare path).
            full = {m.endpoint.name for m in members if m.load.in_flight >= limit}
            exclude = exclude | full
            decision = self.policy.route(request, loads, exclude)
        member = members[decision.index]
        if member.endpoint.name in exclude:
            raise AssertionError(f"policy {self.policy.name} picked excluded endpoint {member.endpoint.name}")
        self._dispatch(request, member, decision.index, loads)
        return member, decision

    def _dispatch(self, request: RequestView, member: Member, index: int, loads: list[InstanceLoad]) -> None:
        self.policy.on_dispatch(request, index, loads)
        member.load.in_flight += 1
        member.load.pending_prefill_tokens += request.prompt_tokens
        member.load.pending_prefill += 1

    async def admit(self, request: RequestView, exclude: frozenset[str] = frozenset()) -> tuple[Member, str] | None:
        """The endpoint a request goes to, and why. A holding pool keeps the request in its
        policy's queue until released (`pump`); a retry (`exclude`) skips the queue. None: no
        endpoint has room (non-holding pools only). Cancelling the caller while it waits takes the
        request off the queue, so nothing is sent upstream and its slot is free at once. While
        `bypass` is set, new requests are routed at once; those already held leave as usual."""
        holder = self.holder
        if holder is None or exclude or self.bypass or request.request_id in self.waiting:
            chosen = self.choose(request, exclude)
            return None if chosen is None else (chosen[0], chosen[1].reason)
        members = self.healthy()
        if not members:
            raise NoEndpoint
        if all(m.load.in_flight >= self.max_inflight for m in members):
            return None   # saturated: shed load at once, as without holding
        if len(self.waiting) >= self.max_queued:
            raise QueueFull
        loads = self._healthy_loads
        decision = holder.route(request, loads)
        holder.hold(request, decision.index, loads, decision.reason)
        released: asyncio.Future[tuple[Member, str]] = asyncio.get_running_loop().create_future()
        self.waiting[request.request_id] = released
        self.pump()
        if released.done():
            return released.result()  # released at once: no suspension on the common path
        if self.on_queued is not None:
            self.on_queued()
        try:
            return await released
        except asyncio.CancelledError:
            if released.done() and not released.cancelled():
                # Released in the same loop turn as the client left: undo the dispatch.
                member = released.result()[0]
                self.first_token(member, request, None)
                self.finish(member, request, Outcome(member.endpoint.name, "cancelled", False))
            else:
                self.waiting.pop(request.request_id, None)
                holder.cancel(request.request_id)
            raise

    def pump(self, now: float | None = None) -> None:
        """Hand out whatever the policy releases now (late binding: the instance is the one the
        request is queued at when it leaves, possibly moved there by rebalancing)."""
        holder = self.holder
        if holder is None or not self.waiting:
            return
        members = self.healthy()
        if not members:
            for request_id, released in list(self.waiting.items()):
                holder.cancel(request_id)
                if not released.done():
                    released.set_exception(NoEndpoint())
            self.waiting.clear()
            return
        loads = self._healthy_loads
        for request, index, reason in holder.release(loads, now):
            released = self.waiting.pop(request.request_id)
            if released.done():
                continue  # its client left in this loop turn; the request was never dispatched
            member = members[index]
            self._dispatch(request, member, index, loads)
            released.set_result((member, reason))

    def set_bypass(self, on: bool) -> None:
        """Stop or resume holding new requests; stopping also sends every held one at once, or the
        requests that bypass the queue would keep them there behind their own prefills."""
        self.bypass = on
        holder = self.holder
        if not on or holder is None or not self.waiting:
            return
        members = self.healthy()
        if not members:
            self.pump()   # fails every waiter with NoEndpoint
            return
        loads = self._healthy_loads
        for request, index, reason in holder.release_all(loads):
            released = self.waiting.pop(request.request_id)
            if not released.done():
                self._dispatch(request, members[index], index, loads)
                released.set_result((members[index], reason))

    def queued(self) -> dict[str, int]:
        return {} if self.holder is None else self.holder.queued()

    def first_token(self, member: Member, request: RequestView, ttft_s: float | None) -> None:
        member.load.pending_prefill_tokens -= request.prompt_tokens
        member.load.pending_prefill -= 1
        self.policy.on_first_token(request.request_id, ttft_s)
        if self.waiting:
            self.pump()

    def finish(self, member: Member, request: RequestView, outcome: Outcome) -> None:
        """A dispatch ended (once per dispatch, after its `first_token`): the policy hears how."""
        member.load.in_flight -= 1
        self.policy.on_complete(request, outcome)
        if self.waiting:
            self.pump()

    def succeeded(self, member: Member) -> None:
        member.breaker.failures = 0

    def revive(self, member: Member) -> None:
        """Close the member's breaker: it answered a health check after failures that came before
        it was listening (a cold start's scrapes), so its cooldown would only delay the first request."""
        member.breaker = Breaker()
        self._healthy = None

    def failed(self, member: Member) -> bool:
        """Count a failure; returns True when this one opened the breaker."""
        b = member.breaker
        b.failures += 1
        if b.failures >= self.breaker_failures and not b.is_open(time.monotonic()):
            b.open_until = time.monotonic() + self.breaker_cooldown_s
            b.failures = 0
            self._healthy = None
            return True
        return False
