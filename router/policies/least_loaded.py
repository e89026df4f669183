"""Least-loaded: the instance with the fewest uncompleted prefill tokens, then fewest in flight.

Uses only what the router dispatched itself, so it reacts within one request (scraped engine
metrics lag by a scrape interval).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvpilot.router.policy import BasePolicy, Decision, InstanceLoad, RequestView


class LeastLoaded(BasePolicy):
    name = "least-loaded"

    def route(self, request: RequestView, instances: Sequence[InstanceLoad]) -> Decision:
        if not instances:
            raise LookupError("no instances to route to")
        best = min(range(len(instances)),
                   key=lambda i: (instances[i].pending_prefill_tokens, instances[i].in_flight, i))
        return Decision(best, "least-loaded")
