"""Round-robin: the baseline every KV-aware policy must beat."""

from __future__ import annotations

from collections.abc import Sequence

from kvpilot.router.policy import BasePolicy, Decision, InstanceLoad, PolicyContext, RequestView


class RoundRobin(BasePolicy):
    name = "round-robin"

    def __init__(self, context: PolicyContext | None = None) -> None:
        super().__init__(context)
        self._next = self.context.seed

    def route(self, request: RequestView, instances: Sequence[InstanceLoad]) -> Decision:
        if not instances:
            raise LookupError("no instances to route to")
        index = self._next % len(instances)
        self._next = index + 1
        return Decision(index, "round-robin")
