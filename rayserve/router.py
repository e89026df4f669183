"""`KvpilotRouter`: a Ray Serve request router that routes with kvpilot's own policy objects.

Configure it on the deployment whose handle calls carry the prompt (see `kvpilot.ray.prompt`):

    RequestRouterConfig(request_router_class="kvpilot.ray.router.KvpilotRouter",
                        request_router_kwargs={"policy": "dualmap", "slo_ttft_s": 2.0})

Serve builds one router per handle owner (HTTP proxy, each ingress replica, a driver), and they
share nothing: the load and cache estimates, and so where a new prefix is placed, are each
process's own (fed by its queue-length cache, its own dispatches and the replicas' routing stats);
DualMap's rings, which place a prompt the same way in every process, decide only past its follow
rule's wait limit (`kvpilot.ray.adapter.SERVE_DUALMAP`). The mapping lives in `kvpilot.ray.adapter`; this
shell only translates Ray's objects and calls.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvpilot.ray.adapter import PolicyAdapter, serve_policy
from kvpilot.ray.prompt import extract_prompt
from kvpilot.router.policy import PolicyContext

log = logging.getLogger("kvpilot.ray")


def _request_id(pending: PendingRequest | None) -> str:
    return "" if pending is None else str(pending.metadata.internal_request_id)


class KvpilotRouter(RequestRouter):
    """kvpilot's policy (`policy`: any name `kvpilot.router.policies` knows) on a Serve deployment."""

    def initialize_state(self, policy: str = "dualmap", slo_ttft_s: float = 5.0, block_size: int = 16,
                         kv_capacity_tokens: int = 400_000, seed: int = 0, time_scale: float = 1.0,
                         log_level: str | None = None, **_: Any) -> None:
        """Called once per router with the deployment's `request_router_kwargs` (JSON values);
        `time_scale`: the simulator's (engine seconds per wall second), 1 for real engines;
        `log_level` "DEBUG" traces every decision (`PolicyAdapter.rank_view`) to the handle owner's
        stderr, which Ray keeps in its worker logs."""
        if log_level is not None:
            log.setLevel(log_level)
            if not log.handlers:
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
                log.addHandler(handler)
        context = PolicyContext(slo_ttft_s=slo_ttft_s, block_size=block_size,
                                kv_capacity_tokens=kv_capacity_tokens, seed=seed)
        self.adapter = PolicyAdapter(serve_policy(policy, context), block_size=block_size, time_scale=time_scale)
        self._named: dict[str, RunningReplica] = {}

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._named = {r.replica_id.unique_id: r for r in replicas}
        self.adapter.set_members(list(self._named))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._named.pop(replica_id.unique_id, None)
        self.adapter.removed(replica_id.unique_id)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        if set(by_name) - {inst.name for inst in self.adapter.loads}:
            self.adapter.set_members([*self._named, *by_name])
        for name, replica in by_name.items():
            self.adapter.observe(name, self.replica_queue_len_cache.get(replica.replica_id),
                                 replica.routing_stats)
        prompt = None if pending_request is None else extract_prompt(pending_request.args, pending_request.kwargs)
        ranks = self.adapter.rank(_request_id(pending_request), prompt, list(by_name))
        return [[by_name[name] for name in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.adapter.routed(_request_id(pending_request), replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.adapter.completed(str(internal_request_id), replica_id.unique_id)
