"""Global minimum predicted TTFT (Mooncake Conductor-like): look at every instance, take the
one whose predicted TTFT for this request (backlog plus this request's uncached tokens) is
lowest. Cache-aware and load-aware at once, at O(N) cost per request, and with no stable
affinity: ties and near-ties scatter a prefix across instances."""

from __future__ import annotations

from collections.abc import Sequence, Set

from kvpilot.router.estimate import LoadEstimator
from kvpilot.router.policy import (
    NOTHING,
    BasePolicy,
    CacheEstimate,
    Decision,
    InstanceLoad,
    Outcome,
    PolicyContext,
    RequestView,
    allowed,
)


class MinTTFT(BasePolicy):
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

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        self.estimate.dispatched(request, instances[index].name)

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        self.estimate.first_token(request_id, ttft_s)

    def on_complete(self, request: RequestView, outcome: Outcome) -> None:
        self.estimate.completed(request.request_id, outcome.prefilled)

    def cache_estimate(self) -> CacheEstimate:
        return self.estimate
