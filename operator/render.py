"""The functional core: an `LLMService` or `WorkerPool` in, the Kubernetes objects it should own out.

Nothing here talks to the apiserver, so unit tests check every rendered field without a cluster, and
the kopf handlers (`kvpilot.operator.handlers`) only read, call these functions and apply the result.
"""

from __future__ import annotations

import hashlib
import json
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
# A deleted engine pod keeps serving this long after it leaves the router's pool (not Ready, then
# terminating): its in-flight requests finish and the router hands its hot prefixes' KV to the
# pods that inherit their keys before SIGTERM stops the engine.
DRAIN_SECONDS = 20
KV_EVENTS_PORT = 5557  # the router's ZMQ SUB socket; vLLM instances connect and publish KV-cache events
KV_REPLAY_PORT = 5558  # each vLLM instance's replay socket: a (re)started router fetches what it missed
MANAGER = "kvpilot-operator"
ROUTER_CONFIG = "/etc/kvpilot/router.yaml"
# The router's admin listener (migrate, handover, debug, dashboard): a container port only, on no
# Service; reached with `kubectl port-forward` and the token in the `<service>-router-admin` Secret,
# which the operator creates once (a random token) and garbage collection deletes with the service.
ADMIN_PORT = 8001
ADMIN_TOKEN_DIR = "/var/run/secrets/kvpilot-admin"  # not under the ConfigMap mount
# The vLLM the tests run (scripts/vllm-cpu-env.sh); a unit test keeps the two in step.
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"

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


# -- WorkerPool → Deployment and headless Service -------------------------------------------------

def engine_command(spec: WorkerPoolSpec) -> tuple[list[str], list[str]]:
    """(command, args) for the engine container of one role."""
    served = spec.model.served()
    if spec.engine.type == "simulator":
        args = ["sim", "serve", "--profile", spec.engine.profile or "h100-llama3-8b", "--model", served,
                "--host", "0.0.0.0", "--port", str(PORT)]
        kv = spec.kv_transfer
        if spec.role != "aggregated" and kv is not None and kv.backend == "redis" and kv.redis_url:
            args += ["--kv-store", kv.redis_url]  # P/D hands real KV bytes over through Redis
        return ["kvpilot"], [*args, *spec.engine.args]
    args = [_vllm_model_arg(spec), "--host", "0.0.0.0", "--port", str(PORT), "--served-model-name", served,
            "--tensor-parallel-size", str(spec.tensor_parallel), "--enable-prefix-caching"]
    if spec.pipeline_parallel > 1:   # stages in one pod, on its gpus (across nodes takes engine ray-serve)
        args += ["--pipeline-parallel-size", str(spec.pipeline_parallel)]
    if spec.role != "aggregated" or (spec.kv_transfer is not None and spec.kv_transfer.backend == "redis"):
        args += ["--kv-transfer-config", json.dumps(kv_transfer_config(spec), separators=(",", ":"))]
    args += ["--kv-events-config", json.dumps(kv_events_config(spec), separators=(",", ":"))]
    if spec.model.uri and spec.model.uri.startswith("s3://"):
        args += ["--load-format", "runai_streamer"]
    return ["vllm", "serve"], [*args, *spec.engine.args]


def kv_transfer_config(spec: WorkerPoolSpec) -> Obj:
    """vLLM's --kv-transfer-config for one side of a P/D pair: NIXL by default, kvpilot's for Redis
    (which aggregated pools get too: `shared_store`)."""
    backend = spec.kv_transfer.backend if spec.kv_transfer else "nixl"
    if backend == "nixl":
        # Explicit roles (vLLM deprecates kv_both); a pool without GPUs stages KV in host memory.
        role = "kv_producer" if spec.role == "prefill" else "kv_consumer"
        kv: Obj = {"kv_connector": "NixlConnector", "kv_role": role}
        if not spec.gpus:
            kv["kv_buffer_device"] = "cpu"
        return kv
    return redis_kv_transfer_config(spec.kv_transfer.redis_url if spec.kv_transfer else None)


def redis_kv_transfer_config(redis_url: str | None) -> Obj:
    """kvpilot's own connector (`kvpilot.kvtransfer.vllm_connector`): full KV blocks in Redis by
    vLLM's block hash. Both sides save and load (kv_both): prefill saves the prompt, decode loads it
    and saves what it decodes, which a migration's target loads. A failed load recomputes."""
    return {"kv_connector": "KvpilotRedisConnector", "kv_connector_module_path": "kvpilot.kvtransfer.vllm_connector",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"redis_url": redis_url or "redis://127.0.0.1:6379/0"}}


def kv_events_config(spec: WorkerPoolSpec) -> Obj:
    """vLLM's --kv-events-config: dial the router's KV-event socket (a host:port endpoint makes vLLM
    connect rather than bind) and publish under the pod's name, which is the router's endpoint name;
    keep recent batches on a replay socket for a router that starts after them."""
    return {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "$(POD_NAME)",
            "endpoint": f"tcp://{router_name(spec.service)}:{KV_EVENTS_PORT}",
            "replay_endpoint": f"tcp://*:{KV_REPLAY_PORT}"}


def _vllm_model_arg(spec: WorkerPoolSpec) -> str:
    uri = spec.model.uri or ""
    if uri.startswith("pvc://"):
        return _pvc_model_path(uri)
    if uri.startswith("s3://"):
        return uri
    return uri.removeprefix("hf://") or spec.model.name


def engine_env(spec: WorkerPoolSpec) -> list[Obj]:
    env: list[Obj] = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    kv = spec.kv_transfer
    if spec.engine.type == "vllm":  # the KV-event topic (see kv_events_config)
        env.append({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    if spec.engine.type == "vllm" and spec.role != "aggregated" and (kv is None or kv.backend == "nixl"):
        env.append({"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "value": "$(POD_IP)"})
    if spec.engine.type == "simulator" and kv is not None:
        env.append({"name": "KVPILOT_KV_BACKEND", "value": kv.backend})
        if kv.redis_url:
            env.append({"name": "KVPILOT_REDIS_URL", "value": kv.redis_url})
    return env + [e.wire() for e in spec.engine.env]


def engine_resources(spec: WorkerPoolSpec) -> Obj:
    extra = spec.resources.wire() if spec.resources else {}
    limits = {k: str(v) for k, v in extra.get("limits", {}).items()}
    requests = {k: str(v) for k, v in extra.get("requests", {}).items()}
    if spec.gpus:
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = str(spec.gpus)
    return {k: v for k, v in (("limits", limits), ("requests", requests)) if v}


def pool_deployment(spec: WorkerPoolSpec, owner: Owner, defaults: PodDefaults = NO_DEFAULTS,
                    image: str | None = None) -> Obj:
    """The pool's Deployment; `replicas` follows the WorkerPool (and so its scale subresource).
    A simulator runs the `kvpilot` command, so it takes the operator's `image` as the router does
    (a registry mirror or a new tag reaches it); a vLLM engine's image comes from the spec only, so
    changing the operator's image never rolls vLLM workers."""
    labels = _labels(spec.service, "engine", **{LABEL_ROLE: spec.role, LABEL_POOL: owner.name})
    command, args = engine_command(spec)
    slow = spec.engine.type == "vllm"  # vLLM loads weights for minutes; the simulator starts in seconds
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container: Obj = {
        "name": "engine", "image": spec.engine.image or (DEFAULT_VLLM_IMAGE if slow else image or kvpilot_image()),
        "command": command, "args": args, "env": engine_env(spec),
        "ports": [{"name": "http", "containerPort": PORT},
                  *([{"name": "kv-replay", "containerPort": KV_REPLAY_PORT}] if slow else [])],
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 180 if slow else 30},
        "readinessProbe": {**health, "periodSeconds": 5},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 3},
        "lifecycle": {"preStop": {"sleep": {"seconds": DRAIN_SECONDS}}},
    }
    resources = engine_resources(spec)
    if resources:
        container["resources"] = resources
    volumes, mounts = _volumes(spec)
    if mounts:
        container["volumeMounts"] = mounts
    pod: Obj = {"containers": [container], "enableServiceLinks": False,
                "terminationGracePeriodSeconds": DRAIN_SECONDS + 30}
    if volumes:
        pod["volumes"] = volumes
    defaults.apply(pod, container, cache=slow)
    for key, value in (("nodeSelector", spec.node_selector), ("tolerations", spec.tolerations),
                       ("affinity", spec.affinity)):
        if value:
            pod[key] = value
    return adopt({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(owner.name, labels),
                  "spec": {"replicas": spec.replicas, "selector": {"matchLabels": {LABEL_POOL: owner.name}},
                           "template": {"metadata": {"labels": labels, "annotations": {
                               "prometheus.io/scrape": "true", "prometheus.io/port": str(PORT)}}, "spec": pod}}},
                 owner)


def _volumes(spec: WorkerPoolSpec) -> tuple[list[Obj], list[Obj]]:
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    if spec.engine.type == "vllm":  # NCCL and torch workers share tensors through /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    model = _model_volume(spec.model.uri)
    if model is not None:
        volumes.append(model[0])
        mounts.append(model[1])
    return volumes, mounts


def pool_disruption_budget(spec: WorkerPoolSpec, owner: Owner) -> Obj:
    labels = _labels(spec.service, "engine", **{LABEL_ROLE: spec.role, LABEL_POOL: owner.name})
    return disruption_budget(owner.name, owner, labels, {LABEL_POOL: owner.name})


def pool_service(spec: WorkerPoolSpec, owner: Owner) -> Obj:
    """Headless: the router talks to each pod directly, so there is no virtual IP to balance."""
    labels = _labels(spec.service, "engine", **{LABEL_ROLE: spec.role, LABEL_POOL: owner.name})
    return adopt({"apiVersion": "v1", "kind": "Service", "metadata": _meta(owner.name, labels),
                  "spec": {"clusterIP": "None", "selector": {LABEL_POOL: owner.name},
                           "publishNotReadyAddresses": False,
                           "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]}}, owner)
