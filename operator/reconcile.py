"""Reconcile loops: read the cluster, render the desired objects, apply them, write status.

Level-triggered: each function looks at the whole current state and converges it, so it is safe to
call from any event, from a periodic resync, after a restart, or twice at once.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kvpilot import names
from kvpilot.crds import LLMServiceSpec, WorkerPoolSpec
from kvpilot.names import SIM_PROFILE_NAMES
from kvpilot.operator import metrics, render, render_pool, render_ray
from kvpilot.operator import status as st
from kvpilot.operator.kube import Kube, KubeError
from kvpilot.operator.poddefaults import NO_DEFAULTS, PodDefaults
from kvpilot.operator.status import Problem, gpu_capacity, llmservice_status, spec_problems, workerpool_status

Obj = dict[str, Any]
log = logging.getLogger("kvpilot.operator")


@dataclass(frozen=True)
class Outcome:
    """What a service reconcile saw, so the kopf shell can post an Event when the phase changes."""

    old_phase: str | None
    phase: str | None
    message: str


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def known_profiles() -> list[str]:
    return list(SIM_PROFILE_NAMES)


def reconcile_service(kube: Kube, svc: Obj, router_image: str | None = None, monitors: bool = True,
                      defaults: PodDefaults = NO_DEFAULTS, pool_children: bool = False) -> Outcome:
    """LLMService → WorkerPools, the router and (with `monitors`, when the Prometheus Operator's CRDs
    exist) a PodMonitor. An invalid spec changes nothing but the status. Too few GPUs on the nodes
    is no reason to wait: the children are made, and their pods wait for a GPU node (see gpu_capacity).
    `pool_children` (the periodic resync): also re-apply each pool's Deployment, PDB and Service. An
    unchanged pool sends no watch event, so without this a pool child whose deletion or edit the watch
    missed would never come back."""
    owner = render.Owner.of(svc)
    try:
        spec: LLMServiceSpec | None = LLMServiceSpec.model_validate(svc.get("spec") or {})
    except ValidationError as err:
        spec = None
        problems = [Problem("InvalidSpec", str(err).replace("\n", " "))]
    else:
        assert spec is not None
        problems = spec_problems(spec, known_profiles())
    if spec is not None and not problems and spec.engine.type == "ray-serve":
        return reconcile_rayservice(kube, svc, spec, defaults)
    if spec is not None and not problems:
        remove_rayservice(kube, owner)
        wanted = render.workerpools(spec, owner)
        for pool in wanted:
            ensure_workerpool(kube, pool)
        pools = keep_workerpools(kube, owner, {p["metadata"]["name"] for p in wanted})
        if pool_children:
            for pool in pools:
                reconcile_pool(kube, pool, defaults, router_image)
        ensure_admin_secret(kube, owner)
        router = None
        for obj in render.router_objects(spec, owner, router_image, defaults):
            applied = kube.apply(obj)
            router = applied if obj["kind"] == "Deployment" else router
        if monitors:
            ensure_pod_monitor(kube, owner)
        return refresh_service_status(kube, svc, spec, problems, children=(pools, router))
    return refresh_service_status(kube, svc, spec, problems)


def keep_workerpools(kube: Kube, owner: render.Owner, keep: set[str]) -> list[Obj]:
    """The service's WorkerPools named in `keep`; the others it owns (a role no longer in the spec,
    or every pool after a switch to ray-serve) are deleted."""
    pools = []
    for pool in kube.list("WorkerPool", owner.namespace, f"{names.LABEL_SERVICE}={owner.name}"):
        if not _owned_by(pool, owner):
            continue
        if pool["metadata"]["name"] in keep:
            pools.append(pool)
            continue
        log.info("deleting WorkerPool %s/%s: not in the spec any more", owner.namespace, pool["metadata"]["name"])
        kube.delete("WorkerPool", owner.namespace, pool["metadata"]["name"])
    return pools


KUBERAY_MISSING = Problem("KubeRayNotInstalled", "engine ray-serve needs KubeRay: the apiserver does not serve "
                                                  "ray.io/v1 RayService; install KubeRay's CRDs and operator")


def reconcile_rayservice(kube: Kube, svc: Obj, spec: LLMServiceSpec, defaults: PodDefaults = NO_DEFAULTS) -> Outcome:
    """engine ray-serve: the RayService is the one child (KubeRay makes the Ray cluster, Serve runs
    the model and kvpilot's router inside it). Without KubeRay's CRDs nothing is applied and the
    service is Degraded with a reason to act on."""
    owner = render.Owner.of(svc)
    if not kube.serves("RayService"):
        return refresh_service_status(kube, svc, spec, [KUBERAY_MISSING])
    keep_workerpools(kube, owner, set())   # pools from before a switch to ray-serve
    try:
        applied = kube.apply(render_ray.rayservice(spec, svc, defaults=defaults))
    except KubeError as err:
        if err.status == 404:
            kube.forget_served("RayService")   # the CRD may have gone since discovery: ask again next time
        raise
    return refresh_service_status(kube, svc, spec, [], children=([], None), rayservice=applied)


def remove_rayservice(kube: Kube, owner: render.Owner) -> None:
    """After a switch away from ray-serve: delete the RayService this service owns, if any."""
    if not kube.serves("RayService"):
        return
    found = kube.get("RayService", owner.namespace, owner.name)
    if found is not None and _owned_by(found, owner):
        log.info("deleting RayService %s/%s: engine is no longer ray-serve", owner.namespace, owner.name)
        kube.delete("RayService", owner.namespace, owner.name)


_ADMIN_SECRETS: set[str] = set()  # owner uids whose admin Secret this process has seen exist


def ensure_admin_secret(kube: Kube, owner: render.Owner) -> None:
    """Create the router's admin token Secret if it is not there (create only: the operator never
    reads Secrets, and a token once made is not rotated by a reconcile). Once per service per
    process: the router pods cannot start without it, so a deleted one shows as pods pending."""
    key = f"{owner.namespace}/{owner.name}/{owner.uid}"
    if key in _ADMIN_SECRETS:
        return
    try:
        kube.create(render.admin_secret(owner, secrets.token_urlsafe(32)))
    except KubeError as err:
        if err.status != 409:   # 409: it exists already
            raise
    _ADMIN_SECRETS.add(key)


def refresh_service_status(kube: Kube, svc: Obj, spec: LLMServiceSpec | None = None,
                           problems: list[Problem] | None = None,
                           children: tuple[list[Obj], Obj | None] | None = None,
                           rayservice: Obj | None = None, fenced_retry: bool = True) -> Outcome:
    """Recompute the LLMService's status from its children (read now, unless the caller has just
    written them and passes `children`: its WorkerPools and router Deployment, or under ray-serve
    `rayservice`); write it only if it changed, and only over the version of the service it read."""
    meta = svc["metadata"]
    if problems is None:
        try:
            spec = LLMServiceSpec.model_validate(svc.get("spec") or {})
            problems = spec_problems(spec, known_profiles())
        except ValidationError as err:
            spec, problems = None, [Problem("InvalidSpec", str(err).replace("\n", " "))]
    owner = render.Owner.of(svc)
    ray = spec is not None and spec.engine.type == "ray-serve"
    if ray and not problems and not kube.serves("RayService"):
        problems = [KUBERAY_MISSING]
    elif ray and not problems and rayservice is None:
        found = kube.get("RayService", meta["namespace"], meta["name"])
        rayservice = found if found is not None and _owned_by(found, owner) else None
    if children is not None or ray:
        pools, router = children or ([], None)
    else:
        pools = [p for p in kube.list("WorkerPool", meta["namespace"], f"{names.LABEL_SERVICE}={meta['name']}")
                 if _owned_by(p, owner)]
        router = kube.get("Deployment", meta["namespace"], render.router_name(meta["name"]))
    old = svc.get("status") or {}
    gpu = gpu_capacity(spec, kube.max_node_gpus()) if spec is not None else None
    new = llmservice_status(svc, spec, problems, pools, router, now(), gpu, rayservice).wire()
    patch = st.status_patch(old, new)
    if patch is not None:
        # Fenced by the resourceVersion the status was computed from: a reconcile that read the
        # service before an edit (the periodic resync's list, a concurrent handler) would otherwise
        # write the old spec's status over the new one's, e.g. put `prefill` back after the switch
        # to aggregated. On a conflict, recompute once from the service as it is now.
        fence = {"resourceVersion": meta["resourceVersion"]} if meta.get("resourceVersion") else {}
        try:
            kube.merge_patch("LLMService", meta["namespace"], meta["name"],
                             {"metadata": fence, "status": patch} if fence else {"status": patch}, sub="status")
        except KubeError as err:
            if err.status != 409 or not fenced_retry:
                raise
            fresh = kube.get("LLMService", meta["namespace"], meta["name"])
            if fresh is not None:
                return refresh_service_status(kube, fresh, fenced_retry=False)
    metrics.record_conditions(meta["namespace"], meta["name"], new.get("conditions", []))
    ready: Obj = next((c for c in new.get("conditions", []) if c["type"] == ("Degraded" if problems else "Ready")), {})
    return Outcome(old.get("phase"), new.get("phase"), ready.get("message", ""))


def ensure_pod_monitor(kube: Kube, owner: render.Owner) -> None:
    """Apply the PodMonitor if the apiserver serves PodMonitors; without the Prometheus Operator there
    is nothing to scrape with, so nothing is attempted. A CRD removed since discovery is not an error."""
    if not kube.serves("PodMonitor"):
        return
    try:
        kube.apply(render.pod_monitor(owner))
    except KubeError as err:
        if err.status != 404:
            raise
        kube.forget_served("PodMonitor")
        log.info("PodMonitors are no longer served; skipping %s/%s", owner.namespace, owner.name)


def ensure_workerpool(kube: Kube, pool: Obj) -> None:
    """Create with the initial replicas; afterwards apply everything except replicas, which belong to
    whoever scales the pool (kubectl scale, HPA, the autoscaler) through the scale subresource."""
    try:
        kube.create(pool)
        return
    except KubeError as err:
        if err.status != 409:  # it exists: one request either way, where get-then-create or -apply makes two
            raise
    kube.apply(render.without_replicas(pool))


def reconcile_pool(kube: Kube, pool: Obj, defaults: PodDefaults = NO_DEFAULTS, image: str | None = None) -> None:
    """WorkerPool → Deployment, PodDisruptionBudget and headless Service, then the pool's status
    from the Deployment. `image`: the operator's kvpilot image (simulator engines run it)."""
    meta = pool["metadata"]
    owner = render.Owner.of(pool)
    try:
        spec = WorkerPoolSpec.model_validate(pool["spec"])
    except ValidationError as err:
        log.warning("WorkerPool %s/%s does not parse: %s", meta["namespace"], meta["name"], err)
        return
    deployment = kube.apply(render_pool.pool_deployment(spec, owner, defaults, image))
    kube.apply(render_pool.pool_disruption_budget(spec, owner))
    kube.apply(render_pool.pool_service(spec, owner))
    refresh_pool_status(kube, pool, deployment)


def refresh_pool_status(kube: Kube, pool: Obj, deployment: Obj | None) -> None:
    """The WorkerPool's status from its Deployment as given; written only if it changed."""
    meta = pool["metadata"]
    new = workerpool_status(pool, deployment, now()).wire()
    old = pool.get("status") or {}
    if {k: v for k, v in old.items() if k in new} != new:
        kube.merge_patch("WorkerPool", meta["namespace"], meta["name"], {"status": new}, sub="status")


def reconcile_pool_named(kube: Kube, namespace: str, name: str, status_only: bool = False,
                         defaults: PodDefaults = NO_DEFAULTS, image: str | None = None) -> None:
    """Re-apply the pool's children, or (`status_only`) only refresh its status from its Deployment."""
    pool = kube.get("WorkerPool", namespace, name)
    if pool is None or pool["metadata"].get("deletionTimestamp") is not None:
        return
    if status_only:
        refresh_pool_status(kube, pool, kube.get("Deployment", namespace, name))  # named as its pool
    else:
        reconcile_pool(kube, pool, defaults, image)


def foreign_edits(meta: Obj) -> frozenset[tuple[str, str, str]]:
    """(manager, operation, time) of each managedFields entry by which anyone but the operator (or
    a controller writing status or metadata, such as the Deployment controller's revision
    annotation) owns a field of this object: a manual edit such as `kubectl scale deployment`,
    `kubectl edit` or `kubectl rollout restart`. An entry's time moves whenever its manager changes
    a field, so a new edit gives a new set."""
    return frozenset(
        (entry.get("manager", ""), entry.get("operation", ""), entry.get("time", ""))
        for entry in meta.get("managedFields") or []
        if entry.get("manager") != render.MANAGER and entry.get("subresource") != "status"
        and any(key not in ("f:metadata", "f:status") for key in entry.get("fieldsV1") or {}))


def edited_by_others(meta: Obj) -> bool:
    """Whether anyone else owns a field of this object (`foreign_edits`), which the operator's next
    apply takes back where it renders that field."""
    return bool(foreign_edits(meta))


class Answered:
    """The foreign edits the operator has already answered with a re-apply, per object uid. An apply
    takes back only the fields the operator renders: an edit of one it does not render (the
    `restartedAt` annotation of `kubectl rollout restart`, an env var from `kubectl set env`) keeps
    its owner for good, and re-applying on every later event of that object would never end. Bounded:
    forgetting an object costs one more (idempotent) re-apply."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._seen: dict[str, frozenset[tuple[str, str, str]]] = {}
        self._lock = threading.Lock()

    def new(self, meta: Obj) -> bool:
        """Whether this object carries foreign edits the operator has not answered yet."""
        edits = foreign_edits(meta)
        with self._lock:
            if not edits:
                self._seen.pop(meta.get("uid", ""), None)
            return bool(edits) and self._seen.get(meta.get("uid", "")) != edits

    def answered(self, meta: Obj) -> None:
        """The object's current foreign edits were re-applied over."""
        edits = foreign_edits(meta)
        with self._lock:
            self._seen.pop(meta.get("uid", ""), None)
            if edits:
                self._seen[meta.get("uid", "")] = edits
                while len(self._seen) > self.size:
                    del self._seen[next(iter(self._seen))]


def reconcile_service_named(kube: Kube, namespace: str, name: str, router_image: str | None = None,
                            full: bool = True, monitors: bool = True,
                            defaults: PodDefaults = NO_DEFAULTS) -> Outcome | None:
    svc = kube.get("LLMService", namespace, name)
    if svc is None or svc["metadata"].get("deletionTimestamp") is not None:
        return None
    if not full:
        return refresh_service_status(kube, svc)
    return reconcile_service(kube, svc, router_image, monitors, defaults)


def propagate_replicas(kube: Kube, svc: Obj, edited: set[str]) -> None:
    """The user edited spec.<prefill|decode>.replicas on the LLMService: pass that one change on to
    the pool. Only an edit does this, so a resync never undoes a kubectl scale or the autoscaler.
    Not while the spec is Degraded (it does not parse, or has a spec problem), when the reconcile
    changes nothing but the status either; under ray-serve there are no WorkerPools."""
    try:
        spec = LLMServiceSpec.model_validate(svc.get("spec") or {})
    except ValidationError:
        return
    if spec.engine.type == "ray-serve" or spec_problems(spec, known_profiles()):
        return
    meta = svc["metadata"]
    for role, pool in spec.pools().items():
        if ("decode" if role == "aggregated" else role) in edited:
            name = names.pool_name(meta["name"], role)
            if kube.get("WorkerPool", meta["namespace"], name) is not None:
                kube.merge_patch("WorkerPool", meta["namespace"], name, {"spec": {"replicas": pool.replicas}})


def _owned_by(obj: Obj, owner: render.Owner) -> bool:
    return any(ref.get("uid") == owner.uid for ref in obj["metadata"].get("ownerReferences", []))
