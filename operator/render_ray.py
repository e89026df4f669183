"""The functional core for `engine.type: ray-serve`: an `LLMService` in, a KubeRay `RayService` out.

Under Ray Serve the model's replicas are Serve deployments inside one Ray cluster, and kvpilot's
routing policies run inside Serve as its request router (`kvpilot.ray.router.KvpilotRouter`), so
there are no WorkerPools and no kvpilot router Deployment: the RayService is the only child.
KubeRay turns it into a RayCluster (a head pod and a worker group per pool) and deploys
`serveConfigV2` on it. Field names follow KubeRay's `ray.io/v1` RayService (ray-operator v1.5.0).

Layout of one replica: tensor parallel within a node, pipeline parallel across nodes. Each pipeline
stage is one Ray worker pod holding `gpus / pipelineParallel` GPUs, so a worker group has
`replicas × pipelineParallel` pods. Each group advertises a custom Ray resource named after its pool
(one unit per GPU), and the vLLM engine's placement group asks for it in every bundle, so Ray places
a prefill engine's workers on the prefill pool's nodes (node selectors, tolerations) and not elsewhere.

Pure, like `render.py`: `kopf.adopt` only edits the dict (owner reference, namespace, labels).
"""

from __future__ import annotations

from typing import Any, cast

import kopf
import yaml

from kvpilot import __version__
from kvpilot.crds import LLMServiceSpec, PoolSpec, Role, WorkerPoolSpec
from kvpilot.operator.poddefaults import NO_DEFAULTS, PodDefaults
from kvpilot.operator.render import PORT, _labels, _model_volume, _pvc_model_path
from kvpilot.operator.render_pool import kv_transfer_config

Obj = dict[str, Any]
RAY_API = "ray.io/v1"
RAY_VERSION = "2.60.0"   # the `ray` extra's pin: the request router API is alpha
ROUTER_CLASS = "kvpilot.ray.router.KvpilotRouter"   # kvpilot.ray.app.ROUTER_CLASS, without importing Ray
SIM_BUILDER = "kvpilot.ray.app:from_args"
LLM_BUILDER = "ray.serve.llm:build_openai_app"
PD_BUILDER = "ray.serve.llm:build_pd_openai_app"
APP_NAME = "llm"
SIM_ENGINE_DEPLOYMENT = "SimEngine"
# Ray's own ports on the head: GCS, dashboard (KubeRay submits serveConfigV2 through it), client.
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", PORT))
GROUP_NAMES: dict[Role, str] = {"prefill": "prefill", "decode": "decode", "aggregated": "worker"}


def kvpilot_ray_image() -> str:
    """Ray Serve LLM (vLLM) with kvpilot installed: the router class is imported by path in every
    process that holds a handle (proxy, ingress, engines), so the image must carry kvpilot.
    `rayproject/ray-llm:2.60.0-py311-cu128` + `pip install kvpilot[ray]` (docs/ray-serve.md)."""
    return f"ghcr.io/kvpilot/kvpilot-ray-llm:{__version__.split('+')[0]}"


def is_simulated(spec: LLMServiceSpec) -> bool:
    """ray-serve with a simulator profile runs kvpilot's engine model as the Serve app (no vLLM, no GPU)."""
    return spec.engine.type == "ray-serve" and spec.engine.profile is not None


def serve_service_name(service: str) -> str:
    """The Service KubeRay puts in front of the pods whose Serve proxy is healthy (`<name>-serve-svc`)."""
    return f"{service}-serve-svc"


def pool_resource(role: Role) -> str:
    """The custom Ray resource a pool's worker pods advertise, one unit per GPU."""
    return f"kvpilot-{GROUP_NAMES[role]}"


def pod_gpus(pool: PoolSpec) -> int:
    """GPUs of one Ray worker pod: a pipeline stage of one replica."""
    return pool.gpus // pool.pipeline_parallel


# -- serveConfigV2 -----------------------------------------------------------------------------

def router_config(spec: LLMServiceSpec) -> Obj:
    """`request_router_config` of every engine deployment: kvpilot's policy with the service's SLO."""
    return {"request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {"policy": spec.routing.policy, "slo_ttft_s": spec.slo.ttft_ms / 1000,
                                      "block_size": spec.routing.block_size},
            "request_routing_stats_period_s": 1.0}


def replica_options(spec: LLMServiceSpec, pool: PoolSpec) -> Obj:
    """How many Serve replicas: fixed, or Ray Serve's autoscaler between the pool's bounds when
    `autoscaling.enabled` (kvpilot's autoscaler does not size RayServices: docs/ray-serve.md)."""
    if not spec.autoscaling.enabled:
        return {"num_replicas": pool.replicas}
    low = pool.min_replicas if pool.min_replicas is not None else pool.replicas
    high = pool.max_replicas if pool.max_replicas is not None else max(pool.replicas, low)
    return {"autoscaling_config": {"min_replicas": low, "initial_replicas": pool.replicas, "max_replicas": high,
                                   "upscale_delay_s": spec.autoscaling.scale_up_stabilization_seconds,
                                   "downscale_delay_s": spec.autoscaling.scale_down_stabilization_seconds}}


def llm_config(spec: LLMServiceSpec, role: Role, pool: PoolSpec) -> Obj:
    """One Ray Serve LLM `LLMConfig` (as the dict `build_openai_app` / `build_pd_openai_app` validate)."""
    engine_kwargs: Obj = {"tensor_parallel_size": pool.tensor_parallel,
                          "pipeline_parallel_size": pool.pipeline_parallel,
                          "enable_prefix_caching": True}
    if role != "aggregated":   # the same connector config the vLLM pools get (render_pool.kv_transfer_config)
        side = WorkerPoolSpec(service="-", role=role, model=spec.model, engine=spec.engine,
                              kv_transfer=spec.kv_transfer, **pool.model_dump())
        engine_kwargs["kv_transfer_config"] = kv_transfer_config(side)
    engine_kwargs.update(engine_kwargs_from_args(spec.engine.args))
    return {
        "model_loading_config": {"model_id": spec.model.served(), "model_source": model_source(spec)},
        "engine_kwargs": engine_kwargs,
        "placement_group_config": {"bundle_per_worker": {"GPU": 1, pool_resource(role): 1}, "strategy": "PACK"},
        "deployment_config": {**replica_options(spec, pool), "request_router_config": router_config(spec)},
    }


def model_source(spec: LLMServiceSpec) -> str:
    """Where Ray Serve LLM loads the weights: a Hugging Face id, an s3:// URI (Ray Serve LLM streams
    it), or the model directory of a pvc:// claim, mounted into every Ray pod."""
    uri = spec.model.uri or ""
    if uri.startswith("pvc://"):
        return _pvc_model_path(uri)
    return uri.removeprefix("hf://") or spec.model.name


def engine_kwargs_from_args(args: list[str]) -> Obj:
    """`engine.args` in vLLM's CLI spelling (`--max-model-len 32768`, `--enforce-eager`) as the
    engine keyword arguments Ray Serve LLM passes to vLLM (`max_model_len: 32768`, `enforce_eager: true`)."""
    out: Obj = {}
    i = 0
    while i < len(args):
        key, _, inline = args[i].removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if inline:
            out[key] = yaml.safe_load(inline)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[key] = yaml.safe_load(args[i + 1])
            i += 1
        else:
            out[key] = True
        i += 1
    return out


def serve_config(spec: LLMServiceSpec) -> Obj:
    """The Serve config KubeRay deploys (`serveConfigV2`, a YAML string in the RayService)."""
    pools = spec.pools()
    app: Obj = {"name": APP_NAME, "route_prefix": "/"}
    if is_simulated(spec):
        pool = pools.get("aggregated") or pools["decode"]
        app["import_path"] = SIM_BUILDER
        app["args"] = {"profile": spec.engine.profile, "model": spec.model.served(), "router": None}
        app["deployments"] = [{"name": SIM_ENGINE_DEPLOYMENT, **replica_options(spec, pool),
                               "request_router_config": router_config(spec)}]
    elif spec.mode == "disaggregated":
        app["import_path"] = PD_BUILDER
        app["args"] = {"prefill_config": llm_config(spec, "prefill", pools["prefill"]),
                       "decode_config": llm_config(spec, "decode", pools["decode"])}
    else:
        app["import_path"] = LLM_BUILDER
        app["args"] = {"llm_configs": [llm_config(spec, "aggregated", pools["aggregated"])]}
    return {"http_options": {"host": "0.0.0.0", "port": PORT}, "applications": [app]}


# -- rayClusterConfig --------------------------------------------------------------------------

def _resources(pool: PoolSpec | None, gpus: int, default_cpu: str, default_memory: str) -> Obj:
    extra = pool.resources.wire() if pool is not None and pool.resources else {}
    asked = {k: str(v) for k, v in extra.get("requests", {}).items()}
    requests = {"cpu": default_cpu, "memory": default_memory, **asked}
    limits = {k: str(v) for k, v in extra.get("limits", {}).items()}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, **({"limits": limits} if limits else {})}


def _pod(spec: LLMServiceSpec, name: str, image: str, pool: PoolSpec | None, gpus: int, ports: list[Obj],
         defaults: PodDefaults) -> Obj:
    """A Ray pod template: one container (KubeRay adds `ray start` and its own env around it)."""
    vllm = not is_simulated(spec)
    container: Obj = {"name": name, "image": image, **({"ports": ports} if ports else {}),
                      "resources": _resources(pool, gpus, "2" if vllm else "500m", "8Gi" if vllm else "1Gi"),
                      "env": [e.wire() for e in spec.engine.env]}
    volumes: list[Obj] = []
    if vllm:   # NCCL and torch workers share tensors through /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    model = _model_volume(spec.model.uri) if vllm else None
    if model is not None:
        volumes.append(model[0])
        container["volumeMounts"] = [*container.get("volumeMounts", []), model[1]]
    pod: Obj = {"containers": [container], **({"volumes": volumes} if volumes else {})}
    defaults.apply(pod, container, cache=vllm)
    if not container["env"]:
        del container["env"]
    if pool is not None:
        for key, value in (("nodeSelector", pool.node_selector), ("tolerations", pool.tolerations),
                           ("affinity", pool.affinity)):
            if value:
                pod[key] = value
    return pod


def worker_group(spec: LLMServiceSpec, role: Role, pool: PoolSpec, image: str, defaults: PodDefaults) -> Obj:
    """A pool's Ray worker pods: `pipelineParallel` pods per Serve replica, bounds scaled the same way."""
    per = pool.pipeline_parallel
    low = pool.min_replicas if pool.min_replicas is not None else pool.replicas
    high = pool.max_replicas if pool.max_replicas is not None else max(pool.replicas, low)
    if not spec.autoscaling.enabled:
        low = high = pool.replicas
    gpus = pod_gpus(pool)
    group: Obj = {"groupName": GROUP_NAMES[role], "replicas": pool.replicas * per,
                  "minReplicas": low * per, "maxReplicas": high * per, "rayStartParams": {},
                  "template": {"spec": _pod(spec, "ray-worker", image, pool, gpus, [], defaults)}}
    if gpus:
        group["resources"] = {pool_resource(role): str(gpus)}
    return group


def rayservice(spec: LLMServiceSpec, owner: Obj, image: str | None = None,
               defaults: PodDefaults = NO_DEFAULTS) -> Obj:
    """The RayService for one `ray-serve` LLMService, named as the service and owned by it
    (`kopf.adopt`: garbage collection deletes it, and so its RayCluster, with the LLMService)."""
    meta = owner["metadata"]
    image = spec.engine.image or image or kvpilot_ray_image()
    pools = spec.pools()
    head_ports = [{"name": n, "containerPort": p} for n, p in HEAD_PORTS]
    # The head runs Serve's controller and proxy, no engine: 0 GPUs and, when workers carry the
    # engines, 0 CPUs for Ray's scheduler so no replica lands there.
    head_params = {"dashboard-host": "0.0.0.0", **({} if is_simulated(spec) else {"num-cpus": "0"})}
    # The simulator's app is light (replicas ask for no CPU): it runs on the head, sized by the pool.
    head_pool = (pools.get("aggregated") or pools["decode"]) if is_simulated(spec) else None
    groups = [] if is_simulated(spec) else [worker_group(spec, role, pool, image, defaults)
                                            for role, pool in pools.items()]
    body: Obj = {
        "apiVersion": RAY_API, "kind": "RayService",
        "metadata": {"name": meta["name"], "labels": _labels(meta["name"], "rayservice")},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(spec), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": spec.autoscaling.enabled and not is_simulated(spec),
                "headGroupSpec": {"rayStartParams": head_params,
                                  "template": {"spec": _pod(spec, "ray-head", image, head_pool, 0, head_ports,
                                                            defaults)}},
                "workerGroupSpecs": groups,
            },
        },
    }
    kopf.adopt(body, owner=kopf.Body(cast(kopf.RawBody, owner)))
    return body
