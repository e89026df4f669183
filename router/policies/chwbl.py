"""Consistent hashing with bounded loads (KubeAI's CHWBL): an xxhash ring with 256 virtual nodes;
walk clockwise from the key to the first instance whose in-flight load is within
`load_factor` × the mean (counting this request), so a hot key spills to ring neighbours."""

from __future__ import annotations

import math
from collections.abc import Sequence, Set

from kvpilot.router.engine_load import total_in_flight
from kvpilot.router.hashring import HashRing
from kvpilot.router.policies.affinity import RingAffinity
from kvpilot.router.policy import (
    NOTHING,
    Decision,
    InstanceLoad,
    PolicyContext,
    RequestView,
    least_loaded,
)


class CHWBL(RingAffinity):
    name = "consistent-hash"

    def __init__(self, context: PolicyContext | None = None, *, load_factor: float = 1.25, key_tokens: int = 1024,
                 vnodes: int = 256) -> None:
        super().__init__(context, HashRing(vnodes=vnodes, family="xxh64"), key_tokens)
        self.load_factor = load_factor

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        key = self._ring_key(request, instances)
        total = sum(total_in_flight(i) for i in instances) + 1   # every router replica's requests
        bound = math.ceil(self.load_factor * total / len(instances))
        for rank, name in enumerate(self._ring.walk(key)):
            if name in excluded:
                continue
            i = self._members.index[name]
            if total_in_flight(instances[i]) + 1 <= bound:
                return Decision(i, "affinity" if rank == 0 else "bounded-spill")
        # A bound ≥ the mean always admits some instance; only exclusions can leave none in it.
        return Decision(least_loaded(instances, excluded), "bounded-spill")
