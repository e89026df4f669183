"""Global minimum predicted TTFT (Mooncake Conductor-like): look at every instance, take the
one whose predicted TTFT for this request (backlog plus this request's uncached tokens) is
lowest. Cache-aware and load-aware at once, at O(N) cost per request, and with no stable
affinity: ties and near-ties scatter a prefix across instances."""

from __future__ import annotations

from collections.abc import Sequence, Set

from kvpilot.router.estimate import EstimatingPolicy, LoadEstimator
from kvpilot.router.policy import (
    NOTHING,
    Decision,
    InstanceLoad,
    PolicyContext,
    RequestView,
    allowed,
)


class MinTTFT(EstimatingPolicy):
    name = "min-ttft"

    def __init__(self, context: PolicyContext | None = None) -> None:
        super().__init__(context)
        self.estimate = LoadEstimator(self.context)

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        if not instances:
            raise LookupError("no instances to route to")
        est = self.estimate
        est.track(instances)
        best = min(allowed(instances, excluded),
                   key=lambda i: est.predicted_ttft(instances[i].name, est.uncached(instances[i].name, request)))
        return Decision(best, "min-ttft")
