"""Names two or more components must spell the same: the labels the operator puts on what it
creates (the autoscaler and the router select by them), pool object names, the router's metric
names and label values the autoscaler reads, and the simulator profiles an LLMService may name.

They live here, beside the vLLM metric names (`kvpilot.vllm_metrics`), so that no component imports
another to learn a string: the operator knows no engine, the autoscaler no router module.
"""

from __future__ import annotations

from typing import Literal

from kvpilot.crds import Role

# Labels on every object the operator renders.
LABEL_SERVICE = "kvpilot.io/service"
LABEL_ROLE = "kvpilot.io/role"
LABEL_POOL = "kvpilot.io/workerpool"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"

# A pool's WorkerPool (and Deployment) name is the service's name with the role's suffix.
POOL_SUFFIX: dict[Role, str] = {"prefill": "prefill", "decode": "decode", "aggregated": "worker"}


def pool_name(service: str, role: Role) -> str:
    return f"{service}-{POOL_SUFFIX[role]}"


# How a pool's endpoints serve in the router's config: an aggregated pool's workers do both phases.
EndpointRole = Literal["both", "prefill", "decode"]
POOL_ENDPOINT_ROLE: dict[str, EndpointRole] = {"aggregated": "both", "prefill": "prefill", "decode": "decode"}

# The router's per-pool metrics carry `role=` with these values; the autoscaler reads them back.
POOL_ROLE_LABEL: dict[str, str] = {"aggregated": "main", "prefill": "prefill", "decode": "decode"}
QUEUE_DEPTH = "kvpilot_router_queue_depth"  # requests the router holds back, per pool
COLD_HELD = "kvpilot_router_cold_start_held"  # requests held while a pool wakes from zero, per pool

# Built-in simulator profiles (`kvpilot.sim.profiles.PROFILES`; a unit test keeps the two equal).
SIM_PROFILE_NAMES = ("h100-llama3-8b", "a100-llama3-8b", "h100-qwen2.5-7b", "h100-qwen2.5-0.5b")
