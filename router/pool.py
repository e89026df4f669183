"""A pool of endpoints serving one model in one role, with its policy, loads and breakers.

The pool is the bridge between the pure policy (which sees `InstanceLoad`s and returns an
index) and the proxy (which sees URLs and HTTP failures). An endpoint whose breaker is open is
left out of the list the policy sees, so a dead worker's keys move to ring neighbours and come
back when it recovers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvpilot.router.config import Endpoint
from kvpilot.router.policy import Decision, InstanceLoad, Policy, RequestView


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


class Pool:
    def __init__(self, endpoints: list[Endpoint], policy: Policy, *, breaker_failures: int = 3,
                 breaker_cooldown_s: float = 10.0, max_inflight: int = 256) -> None:
        self.policy = policy
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

    def healthy(self, exclude: frozenset[str] = frozenset()) -> list[Member]:
        """Members whose breaker is closed. Without exclusions the same list object is returned
        until a breaker opens or closes, so policies can skip re-syncing their rings."""
        now = time.monotonic()
        if self._healthy is None or now >= self._healthy_until:
            self._healthy = [m for m in self.members if not m.breaker.is_open(now)]
            self._healthy_loads = [m.load for m in self._healthy]
            self._healthy_until = min((m.breaker.open_until for m in self.members if m.breaker.open_until > now),
                                      default=math.inf)
        if exclude:
            return [m for m in self._healthy if m.endpoint.name not in exclude]
        return self._healthy

    def saturated(self) -> bool:
        """Every healthy endpoint is at its in-flight limit: the caller should shed load (429)."""
        live = self.healthy()
        return bool(live) and all(m.load.in_flight >= self.max_inflight for m in live)

    def choose(self, request: RequestView, exclude: frozenset[str] = frozenset()) -> tuple[Member, Decision] | None:
        members = self.healthy(exclude)
        loads = self._healthy_loads if members is self._healthy else [m.load for m in members]
        if not members or all(m.load.in_flight >= self.max_inflight for m in members):
            return None
        decision = self.policy.route(request, loads)
        if members[decision.index].load.in_flight >= self.max_inflight:
            # The policy's pick is full: choose again among those with room.
            members = [m for m in members if m.load.in_flight < self.max_inflight]
            loads = [m.load for m in members]
            decision = self.policy.route(request, loads)
        member = members[decision.index]
        self.policy.on_dispatch(request, decision.index, loads)
        member.load.in_flight += 1
        member.load.pending_prefill_tokens += request.prompt_tokens
        return member, decision

    def first_token(self, member: Member, request: RequestView, ttft_s: float | None) -> None:
        member.load.pending_prefill_tokens -= request.prompt_tokens
        self.policy.on_first_token(request.request_id, ttft_s)

    def finish(self, member: Member) -> None:
        member.load.in_flight -= 1

    def succeeded(self, member: Member) -> None:
        member.breaker.failures = 0

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
