"""Status as a pure function of what the cluster shows: conditions, phase and per-pool counts.

Also the checks a schema cannot express (they need the cluster: node capacity) and that end in a
`Degraded` condition with a message a person can act on, instead of children that never schedule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvpilot.crds import Condition, LLMServiceSpec, LLMServiceStatus, PoolStatus, WorkerPoolStatus
from kvpilot.names import LABEL_POOL
from kvpilot.operator.render import PORT, router_name

Obj = dict[str, Any]


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


def spec_problems(spec: LLMServiceSpec, max_node_gpus: int, known_profiles: Iterable[str]) -> list[Problem]:
    """What would make the children useless although the schema accepted the spec."""
    problems: list[Problem] = []
    if spec.engine.type == "ray-serve":
        problems.append(Problem("UnsupportedEngine", "engine.type ray-serve is not supported by this operator "
                                                     "version yet; use vllm or simulator"))
    profiles = sorted(known_profiles)
    if spec.engine.type == "simulator" and spec.engine.profile and spec.engine.profile not in profiles:
        problems.append(Problem("UnknownProfile", f"engine.profile {spec.engine.profile!r} is not a simulator "
                                                  f"profile; known: {', '.join(profiles)}"))
    for role, pool in spec.pools().items():
        if pool.gpus > max_node_gpus:
            problems.append(Problem(
                "InsufficientGPUCapacity",
                f"{role} asks for {pool.gpus} nvidia.com/gpu per replica but the largest node has "
                f"{max_node_gpus} allocatable; lower gpus (and tensorParallel) or add bigger nodes"))
    return problems


def set_condition(conditions: list[Condition], type_: str, status: bool, reason: str, message: str,
                  now: str, generation: int | None) -> list[Condition]:
    """Replace one condition, keeping its lastTransitionTime unless its status flipped."""
    value: Any = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == value else now
    new = Condition(type=type_, status=value, reason=reason, message=message, last_transition_time=since,
                    observed_generation=generation)
    return [c for c in conditions if c.type != type_] + [new]


def deployment_counts(deployment: Obj | None) -> tuple[int, int, int]:
    """(replicas, ready, updated) of a Deployment, zeros when it does not exist yet."""
    status = (deployment or {}).get("status") or {}
    return int(status.get("replicas", 0)), int(status.get("readyReplicas", 0)), int(status.get("updatedReplicas", 0))


def workerpool_status(pool: Obj, deployment: Obj | None, now: str) -> WorkerPoolStatus:
    name, generation = pool["metadata"]["name"], pool["metadata"].get("generation")
    desired = int(pool["spec"].get("replicas", 1))
    replicas, ready, updated = deployment_counts(deployment)
    old = WorkerPoolStatus.model_validate(pool.get("status") or {})
    is_ready = deployment is not None and ready >= desired and updated >= desired and replicas == desired
    message = f"{ready}/{desired} replicas ready" + ("" if deployment else "; Deployment not created yet")
    conditions = set_condition(old.conditions, "Ready", is_ready, "ReplicasReady" if is_ready else "ReplicasNotReady",
                               message, now, generation)
    return WorkerPoolStatus(replicas=replicas, ready_replicas=ready, updated_replicas=updated,
                            selector=f"{LABEL_POOL}={name}", observed_generation=generation, conditions=conditions)


def llmservice_status(svc: Obj, spec: LLMServiceSpec | None, problems: list[Problem], pools: list[Obj],
                      router: Obj | None, now: str) -> LLMServiceStatus:
    """Aggregate WorkerPools and the router Deployment into the LLMService's status."""
    meta = svc["metadata"]
    generation = meta.get("generation")
    old = LLMServiceStatus.model_validate(svc.get("status") or {})
    status = LLMServiceStatus(observed_generation=generation, conditions=old.conditions,
                              endpoint=f"http://{router_name(meta['name'])}.{meta['namespace']}.svc:{PORT}")
    by_role = {p["spec"]["role"]: p for p in pools}
    waiting: list[str] = []
    for role in (spec.pools() if spec else {}):
        pool = by_role.get(role)
        desired = int(pool["spec"].get("replicas", 0)) if pool else 0
        pstatus = (pool or {}).get("status") or {}
        counts = PoolStatus(desired=desired, replicas=int(pstatus.get("replicas", 0)),
                            ready=int(pstatus.get("readyReplicas", 0)))
        setattr(status, "decode" if role == "aggregated" else role, counts)
        if pool is None:
            waiting.append(f"WorkerPool {role} not created")
        elif counts.ready < desired or pstatus.get("observedGeneration") != pool["metadata"].get("generation"):
            waiting.append(f"{role} {counts.ready}/{desired} ready")
    r_replicas, r_ready, _ = deployment_counts(router)
    status.router = PoolStatus(desired=1, replicas=r_replicas, ready=r_ready)
    if r_ready < 1:
        waiting.append("router not ready")

    degraded = bool(problems) or spec is None
    if degraded:
        reason = problems[0].reason if problems else "InvalidSpec"
        message = "; ".join(p.message for p in problems) or "spec does not parse"
        status.conditions = set_condition(status.conditions, "Degraded", True, reason, message, now, generation)
        status.conditions = set_condition(status.conditions, "Progressing", False, reason,
                                          "changes are not applied until the spec is fixed", now, generation)
    else:
        status.conditions = set_condition(status.conditions, "Degraded", False, "AsExpected", "", now, generation)
        status.conditions = set_condition(status.conditions, "Progressing", bool(waiting),
                                          "RollingOut" if waiting else "Complete", "; ".join(waiting), now, generation)
    ready = not degraded and not waiting
    status.conditions = set_condition(status.conditions, "Ready", ready, "AllReplicasReady" if ready else "NotReady",
                                      "all pools and the router are ready" if ready else "; ".join(waiting)
                                      or "see Degraded", now, generation)
    status.conditions.sort(key=lambda c: ("Ready", "Progressing", "Degraded").index(c.type)
                           if c.type in ("Ready", "Progressing", "Degraded") else 3)
    status.phase = "Degraded" if degraded else "Ready" if ready else "Progressing"
    return status
