"""Least-loaded: the instance with the fewest uncompleted prefill tokens, then fewest in flight.

Uses only what the router dispatched itself, so it reacts within one request (scraped engine
metrics lag by a scrape interval).
"""

from __future__ import annotations

from collections.abc import Sequence, Set

from kvpilot.router.policy import NOTHING, BasePolicy, Decision, InstanceLoad, RequestView, least_loaded


class LeastLoaded(BasePolicy):
    name = "least-loaded"

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        return Decision(least_loaded(instances, excluded), "least-loaded")
