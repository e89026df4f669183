"""The functional core: an `LLMService` in, the Kubernetes objects it should own out (its WorkerPools,
the router, the admin Secret, the PodMonitor); a WorkerPool's own children are `render_pool`'s.

Nothing here talks to the apiserver, so unit tests check every rendered field without a cluster, and
the kopf handlers (`kvpilot.operator.handlers`) only read, call these functions and apply the result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
import yaml

from kvpilot import __version__
from kvpilot.crds import API_VERSION, LLMServiceSpec, PoolSpec, Role, WorkerPoolSpec
from kvpilot.names import (
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_POOL,
    LABEL_ROLE,
    LABEL_SERVICE,
    POOL_ENDPOINT_ROLE,
    pool_name,
)
from kvpilot.operator.poddefaults import NO_DEFAULTS, PodDefaults, spread

PORT = 8000
KV_EVENTS_PORT = 5557  # the router's ZMQ SUB socket; vLLM instances connect and publish KV-cache events
KV_REPLAY_PORT = 5558  # each vLLM instance's replay socket: a (re)started router fetches what it missed
MANAGER = "kvpilot-operator"
ROUTER_CONFIG = "/etc/kvpilot/router.yaml"
# The router's admin listener (migrate, handover, debug, dashboard): a container port only, on no
# Service; reached with `kubectl port-forward` and the token in the `<service>-router-admin` Secret,
# which the operator creates once (a random token) and garbage collection deletes with the service.
ADMIN_PORT = 8001
ADMIN_TOKEN_DIR = "/var/run/secrets/kvpilot-admin"  # not under the ConfigMap mount

Obj = dict[str, Any]


@dataclass(frozen=True)
class Owner:
    """The object that owns what is rendered: garbage collection deletes children with it, and the
    children inherit its labels (`adopt`)."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def of(cls, body: Obj) -> Owner:
        meta = body["metadata"]
        return cls(body["apiVersion"], body["kind"], meta["name"], meta["namespace"], meta["uid"],
                   dict(meta.get("labels") or {}))

    def body(self) -> kopf.Body:
        """The owner as kopf sees a handler's object: what `kopf.adopt` reads."""
        meta = {"name": self.name, "namespace": self.namespace, "uid": self.uid, "labels": dict(self.labels)}
        return kopf.Body(cast(kopf.RawBody, {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta}))


def adopt(obj: Obj, owner: Owner) -> Obj:
    """`kopf.adopt`: an owner reference (controller, blockOwnerDeletion) so garbage collection
    deletes the children with their owner, the owner's namespace, and the owner's labels where the
    child has no label of that key (the operator's own labels win). It only edits the dicts, so
    rendering stays pure. Names are the operator's own (`harmonize_naming` keeps a set name)."""
    kopf.adopt(obj, owner=owner.body())
    return obj


def kvpilot_image() -> str:
    """The image holding the `kvpilot` command (router and simulator); the operator may override it."""
    return f"ghcr.io/kvpilot/kvpilot:{__version__.split('+')[0]}"


def router_name(service: str) -> str:
    return f"{service}-router"


def admin_secret_name(service: str) -> str:
    return f"{router_name(service)}-admin"


def admin_secret(owner: Owner, token: str) -> Obj:
    """The router's admin token. Created once with a random token, never re-applied: rendering stays
    pure and a reconcile does not rotate the token under a running operator's feet."""
    name = admin_secret_name(owner.name)
    return adopt({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": _meta(name, _labels(owner.name, "router")), "stringData": {"token": token}}, owner)


def _meta(name: str, labels: dict[str, str]) -> Obj:
    """Name and labels (a copy: `adopt` adds the owner's labels here, and the same dict may also be
    a pod template's, which must not change with the owner's labels); namespace and owner reference
    come from `adopt`."""
    return {"name": name, "labels": dict(labels)}


def _labels(service: str, component: str, **extra: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kvpilot", "app.kubernetes.io/instance": service,
            LABEL_COMPONENT: component, LABEL_MANAGED_BY: MANAGER, LABEL_SERVICE: service, **extra}


# -- LLMService → WorkerPools and the router ------------------------------------------------------

def workerpools(spec: LLMServiceSpec, owner: Owner) -> list[Obj]:
    """One WorkerPool per role. `spec.replicas` is the initial size only: the handlers create pools
    with it and leave it out of later applies, so kubectl scale, HPA and the autoscaler own it."""
    return [workerpool(spec, role, pool, owner) for role, pool in spec.pools().items()]


def workerpool(spec: LLMServiceSpec, role: Role, pool: PoolSpec, owner: Owner) -> Obj:
    body = WorkerPoolSpec(service=owner.name, role=role, model=spec.model, engine=spec.engine,
                          kv_transfer=spec.kv_transfer if spec.mode == "disaggregated" or shared_store(spec) else None,
                          **pool.model_dump())
    name = pool_name(owner.name, role)
    return adopt({"apiVersion": API_VERSION, "kind": "WorkerPool",
                  "metadata": _meta(name, _labels(owner.name, "workerpool", **{LABEL_ROLE: role})),
                  "spec": body.wire()}, owner)


def shared_store(spec: LLMServiceSpec) -> bool:
    """vLLM engines sharing kvpilot's Redis store (`kvTransfer.backend: redis`): in aggregated
    mode too, every engine saves what it computes and loads what another saved, so a pod that
    inherits a prefix on a scale event (or a migrated stream's target) loads it instead of
    recomputing it, and the router's handover warms pods from the store."""
    return spec.engine.type == "vllm" and spec.kv_transfer is not None and spec.kv_transfer.backend == "redis"


def without_replicas(obj: Obj) -> Obj:
    """The apply form of a WorkerPool: every field but the one the scale subresource owns."""
    return {**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "replicas"}}


def pool_selector(service: str, role: Role) -> str:
    return f"{LABEL_SERVICE}={service},{LABEL_ROLE}={role},{LABEL_COMPONENT}=engine"


def router_config(spec: LLMServiceSpec, owner: Owner) -> Obj:
    """What `kvpilot router --config` reads (`kvpilot.router.config.RouterConfig`): one model,
    whose endpoints are the ready pods of each pool, found by label in this namespace."""
    return {
        "host": "0.0.0.0", "port": PORT,  # the router pod listens on its pod IP
        "adminHost": "0.0.0.0", "adminPort": ADMIN_PORT, "adminTokenFile": f"{ADMIN_TOKEN_DIR}/token",
        "models": [{
            "name": spec.model.served(), "policy": spec.routing.policy, "mode": spec.mode,
            "ttftMs": spec.slo.ttft_ms,
            "discovery": {"namespace": owner.namespace, "port": PORT,
                          "pools": {POOL_ENDPOINT_ROLE[role]: pool_selector(owner.name, role)
                                    for role in spec.pools()}},
            # engine vllm: KV events to follow, and streams migrate by resume (router/resume.py).
            **({"engine": "vllm",
                "kvEvents": {"bind": f"tcp://0.0.0.0:{KV_EVENTS_PORT}", "blockSize": spec.routing.block_size,
                             "replayPort": KV_REPLAY_PORT,
                             **({"tokenizer": tok} if (tok := tokenizer_source(spec)) else {})},
                # the engines share the Redis store: scale-event handovers warm pods from it
                **({"kvTransfer": {"backend": "redis"}} if shared_store(spec) else {})}
               if spec.engine.type == "vllm" else {}),
            **({"migration": {"enabled": True, "tpotMs": spec.slo.tpot_ms}} if spec.routing.migration else {}),
        }],
    }


# Engine env the router needs too, to fetch the model's tokenizer from the Hugging Face hub.
HF_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE")


def tokenizer_source(spec: LLMServiceSpec) -> str | None:
    """Where the router reads the model's tokenizer and chat template, to key prompts as the engine
    does for its KV events: the engine's own model directory on a PVC (mounted into the router
    too), or the Hugging Face hub. None for S3: the router does not stream from S3, and without
    a tokenizer it routes vLLM pools on its shadow estimate."""
    uri = spec.model.uri or ""
    if uri.startswith("pvc://"):
        return _pvc_model_path(uri)
    if uri.startswith("s3://"):
        return None
    return "hf://" + (uri.removeprefix("hf://") or spec.model.name)


def _pvc_model_path(uri: str) -> str:
    return "/models/" + uri.removeprefix("pvc://")


def _model_volume(uri: str | None) -> tuple[Obj, Obj] | None:
    """(volume, mount) of a pvc:// model: the claim, read-only under /models/<claim>."""
    if not uri or not uri.startswith("pvc://"):
        return None
    claim = uri.removeprefix("pvc://").split("/", 1)[0]
    return ({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
            {"name": "model", "mountPath": f"/models/{claim}", "readOnly": True})


def router_objects(spec: LLMServiceSpec, owner: Owner, image: str | None = None,
                   defaults: PodDefaults = NO_DEFAULTS) -> list[Obj]:
    """ServiceAccount + Role (read pods) + RoleBinding, ConfigMap, Deployment (spec.routing.replicas,
    spread over nodes and zones), its PodDisruptionBudget and Service."""
    name = router_name(owner.name)
    labels = _labels(owner.name, "router")
    config_text = yaml.safe_dump(router_config(spec, owner), sort_keys=False)
    digest = hashlib.sha256(config_text.encode()).hexdigest()[:16]
    selector = {LABEL_SERVICE: owner.name, LABEL_COMPONENT: "router"}
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}
    container = {
        "name": "router", "image": image or kvpilot_image(),
        "command": ["kvpilot", "router", "--config", ROUTER_CONFIG],
        "ports": [{"name": "http", "containerPort": PORT}, {"name": "kv-events", "containerPort": KV_EVENTS_PORT},
                  {"name": "admin", "containerPort": ADMIN_PORT}],
        "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                *([e.wire() for e in spec.engine.env if e.name in HF_ENV] if spec.engine.type == "vllm" else [])],
        "readinessProbe": probe, "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
    }
    volumes: list[Obj] = [{"name": "config", "configMap": {"name": name}},
                          {"name": "admin", "secret": {"secretName": admin_secret_name(owner.name)}}]
    mounts: list[Obj] = [{"name": "config", "mountPath": "/etc/kvpilot", "readOnly": True},
                         {"name": "admin", "mountPath": ADMIN_TOKEN_DIR, "readOnly": True}]
    model = _model_volume(spec.model.uri) if spec.engine.type == "vllm" else None
    if model is not None:   # the engine's model directory, for its tokenizer (tokenizer_source)
        volumes.append(model[0])
        mounts.append(model[1])
    container["volumeMounts"] = mounts
    pod: Obj = {"serviceAccountName": name, "containers": [container], "volumes": volumes,
                "topologySpreadConstraints": spread(selector)}
    defaults.apply(pod, container, cache=spec.engine.type == "vllm")
    return [adopt(obj, owner) for obj in (
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, labels)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(name, labels),
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(name, labels),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, labels),
         "data": {"router.yaml": config_text}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, labels),
         "spec": {"replicas": spec.routing.replicas, "selector": {"matchLabels": selector},
                  "template": {"metadata": {"labels": labels,
                                            "annotations": {"kvpilot.io/config-hash": digest,
                                                            "prometheus.io/scrape": "true",
                                                            "prometheus.io/port": str(PORT)}},
                               "spec": pod}}},
        disruption_budget(name, owner, labels, selector),
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, labels),
         "spec": {"selector": selector, "ports": [{"name": "http", "port": PORT, "targetPort": "http"},
                                                  {"name": "kv-events", "port": KV_EVENTS_PORT,
                                                   "targetPort": "kv-events"}]}},
    )]


def disruption_budget(name: str, owner: Owner, labels: dict[str, str], selector: dict[str, str]) -> Obj:
    """A node drain (or a Karpenter consolidation) takes one pod of the set at a time."""
    return adopt({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(name, labels),
                  "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}, owner)


# Prometheus Operator: one PodMonitor per LLMService scrapes its engines and its router.
MONITORING_API = "monitoring.coreos.com/v1"


def pod_monitor(owner: Owner) -> Obj:
    """Engines (vLLM and the simulator) and the router all serve Prometheus text on `http`/metrics;
    the pods' role, pool and component labels become target labels so dashboards can split by them."""
    return adopt({"apiVersion": MONITORING_API, "kind": "PodMonitor",
                  "metadata": _meta(owner.name, _labels(owner.name, "monitoring")),
                  "spec": {"selector": {"matchLabels": {LABEL_SERVICE: owner.name, LABEL_MANAGED_BY: MANAGER}},
                           "podMetricsEndpoints": [{"port": "http", "path": "/metrics"}],
                           "podTargetLabels": [LABEL_SERVICE, LABEL_ROLE, LABEL_POOL, LABEL_COMPONENT]}}, owner)
