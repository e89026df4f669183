"""Round-robin: the baseline every KV-aware policy must beat."""

from __future__ import annotations

from collections.abc import Sequence

from kvpilot.router.policy import Decision, InstanceLoad, RequestView


class RoundRobin:
    name = "round-robin"

    def __init__(self, seed: int = 0) -> None:
        self._next = seed

    def route(self, request: RequestView, instances: Sequence[InstanceLoad]) -> Decision:
        if not instances:
            raise LookupError("no instances to route to")
        index = self._next % len(instances)
        self._next = index + 1
        return Decision(index, "round-robin")
