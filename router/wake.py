"""Cold-start holding: requests for a model whose pool is at zero wait here while it wakes.

A pool the autoscaler scaled to zero has no instance to route to. Answering 503 would turn every
cold start into client errors; instead the first requests wait in a bounded queue per model, and
the router exports how many wait, per pool role (`kvpilot_router_cold_start_held{model,role}`).
The autoscaler already scrapes the router for its queue depth, so the held count reaches it
through the same door: a pool at zero with requests held for it wakes at once, and in P/D a held
request counts for the prefill and the decode pool alike, so both wake together. A metric rather
than a wake call keeps the router free of any Kubernetes write access and needs no address of the
autoscaler; two routers' held counts simply add up.

Only models whose endpoints can come and go (discovery, an endpoints file) hold; a model with
static endpoints and none listed answers 503 at once, as it never gets an instance.

A request leaves the queue when every pool it needs has an instance that answers its health
check (readiness can run ahead of the process; the router's scrapes of an instance not yet
listening may have opened its breaker, which the caller closes once it answers), with its wait shown to the client
only as a late first token. Past `max_held` a request gets 429; one that waited past the
deadline gets 503; both with Retry-After, in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge

from kvpilot.names import COLD_HELD
from kvpilot.openai_errors import RETRY_AFTER_S, ApiError


@dataclass
class ColdBook:
    """The pure bookkeeping: requests held per model, bounded."""

    max_held: int
    held: dict[str, int] = field(default_factory=dict)

    def admit(self, model: str) -> bool:
        """Take one more request for `model`, unless its queue is full."""
        n = self.held.get(model, 0)
        if n >= self.max_held:
            return False
        self.held[model] = n + 1
        return True

    def release(self, model: str) -> None:
        n = self.held.get(model, 0) - 1
        if n > 0:
            self.held[model] = n
        else:
            self.held.pop(model, None)

    def count(self, model: str) -> int:
        return self.held.get(model, 0)


def needs_wake(member_counts: list[int]) -> bool:
    """Whether a request must wait for a cold start: some pool it needs has no instance at all
    (an instance whose breaker is open is a failure, not a cold start, and is answered as such)."""
    return any(n == 0 for n in member_counts)


Probe = Callable[[str], Awaitable[bool]]   # base URL → whether the instance answers /health


class ColdStarts:
    """Holds requests until their pools have a live instance; exports the held count per role."""

    def __init__(self, registry: CollectorRegistry, max_held: int, deadline_s: float, poll_s: float = 0.1) -> None:
        self.book = ColdBook(max_held)
        self.deadline_s = deadline_s
        self.poll_s = poll_s
        self.gauge = Gauge(COLD_HELD, "Requests held while their model's pools wake from zero replicas, per pool "
                           "role (the autoscaler wakes a pool at zero on it).", ["model", "role"], registry=registry)

    async def hold(self, model: str, roles: list[str], members: Callable[[], list[list[str]]], probe: Probe) -> None:
        """Wait until every pool (`members()`: each pool's member URLs) has an instance that answers
        `probe`; raises ApiError(429) when the queue is full, ApiError(503) past the deadline."""
        if not self.book.admit(model):
            raise ApiError(429, f"model `{model}` is starting from zero replicas and {self.book.max_held} requests "
                                "already wait for it; retry later", "rate_limit_exceeded", retry_after=RETRY_AFTER_S)
        self._export(model, roles)
        try:
            deadline = time.monotonic() + self.deadline_s
            live: set[str] = set()
            while True:
                pools = members()
                for urls in pools:
                    for url in urls:
                        if url not in live and await probe(url):
                            live.add(url)
                if pools and all(any(u in live for u in urls) for urls in pools):
                    return
                if time.monotonic() >= deadline:
                    raise ApiError(503, f"model `{model}` is still starting from zero replicas after "
                                        f"{self.deadline_s:.0f}s; retry later", "service_unavailable",
                                   retry_after=RETRY_AFTER_S)
                await asyncio.sleep(self.poll_s)
        finally:
            self.book.release(model)
            self._export(model, roles)

    def _export(self, model: str, roles: list[str]) -> None:
        for role in roles:
            self.gauge.labels(model, role).set(self.book.count(model))
