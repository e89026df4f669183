"""Single-ring pure affinity: one consistent-hash ring, no load awareness. The ablation that
shows what DualMap's second candidate and SLO switch buy."""

from __future__ import annotations

from collections.abc import Sequence, Set

from kvpilot.router.hashring import HashRing, Membership
from kvpilot.router.policies.dualmap import affinity_key
from kvpilot.router.policy import NOTHING, BasePolicy, Decision, InstanceLoad, PolicyContext, RequestView


class RingAffinity(BasePolicy):
    """What the consistent-hash policies (this one and CHWBL) share: a ring over the instances,
    kept in step with the list each decision is handed, and the key a request lands on (the hash
    of its first `key_tokens` of prompt, in whole blocks)."""

    def __init__(self, context: PolicyContext | None, ring: HashRing, key_tokens: int) -> None:
        super().__init__(context)
        self.depth = max(1, key_tokens // self.context.block_size)
        self._ring = ring
        self._members = Membership(ring)

    def _ring_key(self, request: RequestView, instances: Sequence[InstanceLoad]) -> int:
        """Bring the ring in step with `instances` (LookupError when there are none) and return
        `request`'s key on it."""
        if not instances:
            raise LookupError("no instances to route to")
        self._members.sync(instances)
        return affinity_key(request, self.depth)


class Affinity(RingAffinity):
    name = "affinity"

    def __init__(self, context: PolicyContext | None = None, *, key_tokens: int = 1024) -> None:
        super().__init__(context, HashRing(), key_tokens)

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        key = self._ring_key(request, instances)
        if not excluded:
            return Decision(self._members.index[self._ring.lookup(key)], "affinity")
        for name in self._ring.walk(key):   # the first owner clockwise that is not excluded
            if name not in excluded:
                return Decision(self._members.index[name], "affinity")
        raise LookupError("every instance is excluded")
