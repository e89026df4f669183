"""Status as a pure function of what the cluster shows: conditions, phase and per-pool counts.

Also the checks a schema cannot express (they need the cluster: node capacity) and that end in a
`Degraded` condition with a message a person can act on, instead of children that never schedule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvpilot.crds import Condition, LLMServiceSpec, LLMServiceStatus, PoolSpec, PoolStatus, WorkerPoolStatus
from kvpilot.names import LABEL_POOL
from kvpilot.operator.render import PORT, router_name
from kvpilot.operator.render_ray import serve_service_name

Obj = dict[str, Any]


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


def spec_problems(spec: LLMServiceSpec, known_profiles: Iterable[str]) -> list[Problem]:
    """What would make the children useless although the schema accepted the spec."""
    problems: list[Problem] = []
    profiles = sorted(known_profiles)
    if spec.engine.type == "ray-serve":
        problems += ray_problems(spec)
    if spec.engine.type != "vllm" and spec.engine.profile and spec.engine.profile not in profiles:
        problems.append(Problem("UnknownProfile", f"engine.profile {spec.engine.profile!r} is not a simulator "
                                                  f"profile; known: {', '.join(profiles)}"))
    if wrong := pod_field_errors(spec):
        problems.append(Problem("InvalidPodFields", "fields copied into the pods would be rejected by the apiserver "
                                                    "after part of the service was made: " + "; ".join(wrong)))
    return problems


# Kubernetes' own syntax for what the operator copies verbatim into pod templates. The CRD takes
# these as free strings (a schema cannot say all of it), so without this check the WorkerPools and
# the router were made and then the pools' Deployments rejected: a half-applied service that looked
# merely slow (found by tests/e2e/operator/test_spec_fuzz.py).
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUANTITY = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?")
_TOLERATION_KEYS = frozenset({"key", "operator", "value", "effect", "tolerationSeconds"})


def _label_key_ok(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return bool(_LABEL_NAME.fullmatch(name))


def _label_value_ok(value: object) -> bool:
    return isinstance(value, str) and (value == "" or bool(_LABEL_NAME.fullmatch(value)))


def _toleration_errors(where: str, t: dict[str, Any]) -> list[str]:
    errors = [f"{where}: unknown field {k!r}" for k in t if k not in _TOLERATION_KEYS]
    op, effect, key, value = t.get("operator", "Equal"), t.get("effect", ""), t.get("key", ""), t.get("value", "")
    if op not in ("Equal", "Exists", ""):
        errors.append(f"{where}.operator {op!r}: not Equal or Exists")
    if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute", ""):
        errors.append(f"{where}.effect {effect!r}: not NoSchedule, PreferNoSchedule or NoExecute")
    if not isinstance(key, str) or (key and not _label_key_ok(key)) or (not key and op != "Exists"):
        errors.append(f"{where}.key {key!r}: a label key, or empty with operator Exists")
    if not _label_value_ok(value) or (op == "Exists" and value):
        errors.append(f"{where}.value {value!r}: a label value, empty with operator Exists")
    seconds = t.get("tolerationSeconds")
    if seconds is not None and (not isinstance(seconds, int) or isinstance(seconds, bool) or effect != "NoExecute"):
        errors.append(f"{where}.tolerationSeconds {seconds!r}: an integer, with effect NoExecute only")
    return errors


def pod_field_errors(spec: LLMServiceSpec) -> list[str]:
    """What in the spec's env, nodeSelector, tolerations and resource quantities a Pod would not take."""
    errors = [f"engine.env[{i}].name {e.name[:40]!r}: printable ASCII without '='"
              for i, e in enumerate(spec.engine.env)
              if not all(" " <= c <= "~" for c in e.name) or "=" in e.name]
    for role, pool in spec.pools().items():
        field = "decode" if role == "aggregated" else role
        for key, value in (pool.node_selector or {}).items():
            if not _label_key_ok(key) or not _label_value_ok(value):
                errors.append(f"{field}.nodeSelector {key[:40]!r}: {str(value)[:40]!r}: not a label key and value")
        for i, t in enumerate(pool.tolerations or []):
            errors += _toleration_errors(f"{field}.tolerations[{i}]", t)
        for kind in ("requests", "limits"):
            for name, q in (getattr(pool.resources, kind) or {}).items() if pool.resources else ():
                if not _label_key_ok(name) or not (q >= 0 if isinstance(q, int) else _QUANTITY.fullmatch(q)):
                    errors.append(f"{field}.resources.{kind} {name[:40]!r}: {str(q)[:40]!r}: not a resource name "
                                  "and a non-negative quantity")
    return errors


def ray_problems(spec: LLMServiceSpec) -> list[Problem]:
    """A `ray-serve` spec KubeRay and Ray Serve would accept but cannot serve as asked."""
    if spec.engine.profile is not None:   # the simulator's Serve app: one deployment, no P/D
        if spec.mode == "disaggregated":
            return [Problem("UnsupportedMode", "engine ray-serve with a simulator profile runs one aggregated "
                                               "deployment (kvpilot.ray.app); set mode: aggregated")]
        return []
    wrong = [f"{role}: gpus {pool.gpus}, tensorParallel {pool.tensor_parallel} × pipelineParallel "
             f"{pool.pipeline_parallel}" for role, pool in spec.pools().items()
             if pool.gpus != pool.tensor_parallel * pool.pipeline_parallel]
    if wrong:
        return [Problem("InvalidParallelism", "a Ray Serve LLM replica's vLLM engine uses exactly tensorParallel × "
                                              "pipelineParallel GPUs, one worker pod per pipeline stage; set gpus "
                                              "to that product (" + "; ".join(wrong) + ")")]
    return []


def node_gpus(spec: LLMServiceSpec, pool: PoolSpec) -> int:
    """GPUs one pod of the pool asks for: a whole replica, or under ray-serve one pipeline stage."""
    return pool.gpus // pool.pipeline_parallel if spec.engine.type == "ray-serve" else pool.gpus


def gpu_capacity(spec: LLMServiceSpec, max_node_gpus: int) -> Problem | None:
    """Why some pool's pods cannot be scheduled on any node now, or None when each fits on one.

    Not a reason to hold anything back: a GPU node pool that cluster-autoscaler or Karpenter grows
    from zero has no GPU node until Pending pods ask for one, so the children are created and this
    only explains (as the `GPUCapacity` condition) why their pods wait."""
    short = {role: node_gpus(spec, pool) for role, pool in spec.pools().items()
             if node_gpus(spec, pool) > max_node_gpus}
    if not short:
        return None
    asks = ", ".join(f"{role} {gpus}" for role, gpus in short.items())
    if max_node_gpus == 0:
        return Problem("NoGPUNodes", f"no node has allocatable nvidia.com/gpu (per replica: {asks}); the pods stay "
                                     "Pending until a GPU node joins (a node autoscaler adds one for them)")
    return Problem("InsufficientGPUCapacity",
                   f"the largest node has {max_node_gpus} allocatable nvidia.com/gpu, less than a replica asks "
                   f"for ({asks}); the pods stay Pending until a bigger node joins, or lower gpus and tensorParallel")


def autoscaler_shortage(status: Obj | None) -> Problem | None:
    """GPUs short now, as the autoscaler sees it (`status.autoscaling.<role>.reason` starting
    "waiting for GPUs: N replica(s) unschedulable"): replicas that would fit a node but find no
    free GPU. `gpu_capacity` only says whether one replica fits any node; this says how many wait."""
    pools = (status or {}).get("autoscaling") or {}
    short = [f"{role}: {entry['reason']}" for role, entry in sorted(pools.items())
             if str((entry or {}).get("reason", "")).startswith("waiting for GPUs")]
    return Problem("WaitingForGPUs", "; ".join(short)) if short else None


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


def rayservice_waiting(rayservice: Obj | None) -> str | None:
    """What a RayService still waits for, or None when it serves. KubeRay's `Ready` condition
    (since v1.3; the deprecated `serviceStatus: Running` means the same) says whether requests reach
    a Serve proxy; the Serve applications' statuses say why not."""
    if rayservice is None:
        return "RayService not created"
    status = rayservice.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    serving = ready.get("status") == "True" if ready is not None else status.get("serviceStatus") == "Running"
    if serving:
        return None
    apps = ((status.get("activeServiceStatus") or {}).get("applicationStatuses")
            or (status.get("pendingServiceStatus") or {}).get("applicationStatuses") or {})
    detail = "; ".join(f"app {name} {app.get('status', '?')}" + (f": {app['message']}" if app.get("message") else "")
                       for name, app in sorted(apps.items()))
    why = f"{ready.get('reason', '')}: {ready.get('message', '')}".strip(": ") if ready is not None else ""
    return "RayService not ready" + "".join(f" ({part})" for part in (why, detail) if part)


def llmservice_status(svc: Obj, spec: LLMServiceSpec | None, problems: list[Problem], pools: list[Obj],
                      router: Obj | None, now: str, gpu: Problem | None = None,
                      rayservice: Obj | None = None) -> LLMServiceStatus:
    """Aggregate WorkerPools and the router Deployment (under engine ray-serve: the RayService)
    into the LLMService's status; `gpu` is `gpu_capacity`'s answer (the GPUCapacity condition,
    which never makes the service Degraded)."""
    meta = svc["metadata"]
    generation = meta.get("generation")
    old = LLMServiceStatus.model_validate(svc.get("status") or {})
    ray = spec is not None and spec.engine.type == "ray-serve"
    host = serve_service_name(meta["name"]) if ray else router_name(meta["name"])
    status = LLMServiceStatus(observed_generation=generation, conditions=old.conditions,
                              endpoint=f"http://{host}.{meta['namespace']}.svc:{PORT}")
    by_role = {p["spec"]["role"]: p for p in pools}
    waiting: list[str] = []
    if ray:
        waiting += [w for w in (rayservice_waiting(rayservice),) if w]
    for role in (spec.pools() if spec and not ray else {}):
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
    if not ray:   # under Ray Serve, kvpilot's policy routes inside Serve: no router pods
        r_replicas, r_ready, _ = deployment_counts(router)
        r_desired = spec.routing.replicas if spec else 1
        status.router = PoolStatus(desired=r_desired, replicas=r_replicas, ready=r_ready)
        if r_ready < r_desired:
            waiting.append(f"router {r_ready}/{r_desired} ready")

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
    gpu = gpu or autoscaler_shortage(svc.get("status"))
    if spec is not None:
        status.conditions = set_condition(status.conditions, "GPUCapacity", gpu is None,
                                          gpu.reason if gpu else "Fits",
                                          gpu.message if gpu else "every pool's replica fits on a node",
                                          now, generation)
    ready = not degraded and not waiting
    reason = ("RayServiceReady" if ready else "RayServiceNotReady") if ray and not degraded else \
        "AllReplicasReady" if ready else "NotReady"
    status.conditions = set_condition(status.conditions, "Ready", ready, reason,
                                      ("the RayService serves" if ray else "all pools and the router are ready")
                                      if ready else "; ".join(waiting) or "see Degraded", now, generation)
    order = ("Ready", "Progressing", "Degraded", "GPUCapacity")
    status.conditions.sort(key=lambda c: order.index(c.type) if c.type in order else len(order))
    status.phase = "Degraded" if degraded else "Ready" if ready else "Progressing"
    return status


# The keys of LLMService.status the operator writes; `autoscaling` is the autoscaler's and never touched.
SERVICE_KEYS = frozenset({"phase", "observedGeneration", "conditions", "prefill", "decode", "router", "endpoint"})


def status_patch(old: Obj, new: Obj, owned: frozenset[str] = SERVICE_KEYS) -> Obj | None:
    """The JSON merge patch that turns status `old` into `new` for the keys the operator owns, or
    None when they already match. An owned key that `new` no longer has is removed (null): a merge
    patch of `new` alone would leave, say, `prefill` counts behind after a service goes aggregated."""
    patch: Obj = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k in owned and k not in new})
    return patch or None
