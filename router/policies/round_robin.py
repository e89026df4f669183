"""Round-robin: the baseline every KV-aware policy must beat."""

from __future__ import annotations

from collections.abc import Sequence, Set

from kvpilot.router.policy import NOTHING, BasePolicy, Decision, InstanceLoad, PolicyContext, RequestView


class RoundRobin(BasePolicy):
    name = "round-robin"

    def __init__(self, context: PolicyContext | None = None) -> None:
        super().__init__(context)
        self._next = self.context.seed

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        n = len(instances)
        if not n:
            raise LookupError("no instances to route to")
        for step in range(n):   # the next in turn that is not excluded
            index = (self._next + step) % n
            if instances[index].name not in excluded:
                self._next = index + 1
                return Decision(index, "round-robin")
        raise LookupError("every instance is excluded")
