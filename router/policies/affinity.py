"""Single-ring pure affinity: one consistent-hash ring, no load awareness. The ablation that
shows what DualMap's second candidate and SLO switch buy."""

from __future__ import annotations

from collections.abc import Sequence, Set

from kvpilot.router.hashring import HashRing, Membership
from kvpilot.router.policies.dualmap import affinity_key
from kvpilot.router.policy import NOTHING, BasePolicy, Decision, InstanceLoad, PolicyContext, RequestView


class Affinity(BasePolicy):
    name = "affinity"

    def __init__(self, context: PolicyContext | None = None, *, key_tokens: int = 1024) -> None:
        super().__init__(context)
        self.depth = max(1, key_tokens // self.context.block_size)
        self._ring = HashRing()
        self._members = Membership(self._ring)

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        if not instances:
            raise LookupError("no instances to route to")
        self._members.sync(instances)
        key = affinity_key(request, self.depth)
        if not excluded:
            return Decision(self._members.index[self._ring.lookup(key)], "affinity")
        for name in self._ring.walk(key):   # the first owner clockwise that is not excluded
            if name not in excluded:
                return Decision(self._members.index[name], "affinity")
        raise LookupError("every instance is excluded")
