"""`engine.type: ray-serve` → a KubeRay RayService (`operator/render_ray.py`).

The structure checks follow KubeRay's documented RayService v1 (ray-operator v1.5.0, the Go types in
apis/ray/v1): the only fields a RayService spec, a RayCluster spec and a head or worker group may
have, the ones that are required, and `rayStartParams`/`resources` as maps of strings. The Serve
config is checked by Ray Serve's own schema (`ServeDeploySchema`, ray 2.60.0)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvpilot.crds import LLMService, LLMServiceSpec
from kvpilot.operator import render_ray

ROOT = Path(__file__).resolve().parents[3]
RAY_EXAMPLES = sorted(p for p in (ROOT / "deploy" / "examples").glob("*.yaml")
                      if yaml.safe_load(p.read_text())["spec"].get("engine", {}).get("type") == "ray-serve")
# KubeRay v1.5.0: RayServiceSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec json names.
SERVICE_FIELDS = {"rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold",
                  "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy", "serveConfigV2",
                  "rayClusterConfig", "excludeHeadPodFromServeSvc"}
CLUSTER_FIELDS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                  "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_FIELDS = {"template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType"}
WORKER_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "resources",
                 "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}


def _owner(name: str = "svc") -> dict[str, Any]:
    return {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": "team", "uid": "uid-1"}}


def _render(body: dict[str, Any]) -> dict[str, Any]:
    body = {**body, "metadata": {**body["metadata"], "namespace": "team", "uid": "uid-1"}}
    return render_ray.rayservice(LLMService.model_validate(body).spec, body)


def _spec(**spec: Any) -> LLMServiceSpec:
    return LLMServiceSpec.model_validate({"model": {"name": "org/m"}, "engine": {"type": "ray-serve"}, **spec})


def _serve(rs: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(rs["spec"]["serveConfigV2"])
    return config


def _strings(params: dict[str, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())


def _deployment_options(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every deployment's options: Serve config overrides, and each Ray Serve LLM config's deployment_config."""
    out: list[dict[str, Any]] = []
    for app in config["applications"]:
        out += app.get("deployments", [])
        args = app.get("args") or {}
        out += [c["deployment_config"] for c in [*args.get("llm_configs", []), args.get("prefill_config"),
                                                 args.get("decode_config")] if c]
    return out


def assert_serve_options(options: dict[str, Any]) -> None:
    """Serve ignores unknown deployment keys; a misspelt one would silently leave Serve's defaults."""
    from ray.serve.config import RequestRouterConfig
    from ray.serve.schema import DeploymentSchema

    assert set(options) - {"name"} <= set(DeploymentSchema.model_fields)
    router = options["request_router_config"]
    assert set(router) <= set(RequestRouterConfig.model_fields)
    RequestRouterConfig.model_validate(router)


def assert_kuberay_shape(rs: dict[str, Any]) -> None:
    """What KubeRay documents for RayService v1, field by field."""
    from ray.serve.schema import ServeDeploySchema

    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    spec = rs["spec"]
    assert set(spec) <= SERVICE_FIELDS and "rayClusterConfig" in spec
    assert isinstance(spec["serveConfigV2"], str)   # a YAML multi-line string, parsed by Serve on the head
    ServeDeploySchema.model_validate(_serve(rs))
    for options in _deployment_options(_serve(rs)):
        assert_serve_options(options)
    cluster = spec["rayClusterConfig"]
    assert set(cluster) <= CLUSTER_FIELDS and "headGroupSpec" in cluster
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_FIELDS and "template" in head and _strings(head["rayStartParams"])
    assert [c["name"] for c in head["template"]["spec"]["containers"]] == ["ray-head"]
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_FIELDS
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert _strings(group["rayStartParams"]) and _strings(group.get("resources", {}))
        assert len(group["template"]["spec"]["containers"]) == 1


@pytest.mark.parametrize("path", RAY_EXAMPLES, ids=lambda p: p.name)
def test_ray_examples_render_what_kuberay_documents(path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    rs = _render(body)
    assert_kuberay_shape(rs)
    assert rs["metadata"]["name"] == body["metadata"]["name"] and rs["metadata"]["namespace"] == "team"
    assert rs["metadata"]["ownerReferences"] == [{"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService",
                                                  "name": body["metadata"]["name"], "uid": "uid-1",
                                                  "controller": True, "blockOwnerDeletion": True}]


def test_there_are_ray_examples() -> None:
    assert {p.name for p in RAY_EXAMPLES} >= {"ray-serve-70b.yaml", "ray-serve-simulator.yaml"}


def test_70b_spans_two_nodes_with_tp8_pp2() -> None:
    rs = _render(yaml.safe_load((ROOT / "deploy" / "examples" / "ray-serve-70b.yaml").read_text()))
    app = _serve(rs)["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "llama-3.1-70b",
                                           "model_source": "meta-llama/Llama-3.1-70B-Instruct"}
    kwargs = llm["engine_kwargs"]
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (8, 2)
    assert (kwargs["max_model_len"], kwargs["gpu_memory_utilization"]) == (32768, 0.9)   # from engine.args
    assert llm["placement_group_config"] == {"bundle_per_worker": {"GPU": 1, "kvpilot-worker": 1}, "strategy": "PACK"}
    assert llm["deployment_config"]["num_replicas"] == 1
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("worker", 2, 2, 2)
    assert group["resources"] == {"kvpilot-worker": "8"}   # what each bundle asks for, one per GPU
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"   # no engine on the head
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["requests"]


def test_the_router_is_kvpilots_real_class_on_every_engine_deployment() -> None:
    from kvpilot.ray import app

    assert render_ray.ROUTER_CLASS == app.ROUTER_CLASS
    module, name = render_ray.ROUTER_CLASS.rsplit(".", 1)
    assert importlib.import_module(module).__dict__[name].__name__ == "KvpilotRouter"
    spec = _spec(mode="aggregated", routing={"policy": "cache-aware", "blockSize": 32}, slo={"ttftMs": 1500},
                 decode={"gpus": 1})
    cfg = _serve(render_ray.rayservice(spec, _owner()))["applications"][0]["args"]["llm_configs"][0]
    assert cfg["deployment_config"]["request_router_config"] == {
        "request_router_class": "kvpilot.ray.router.KvpilotRouter",
        "request_router_kwargs": {"policy": "cache-aware", "slo_ttft_s": 1.5, "block_size": 32},
        "request_routing_stats_period_s": 1.0}


def test_disaggregated_is_ray_serve_llms_prefill_and_decode_on_their_own_pools() -> None:
    spec = _spec(mode="disaggregated", kvTransfer={"backend": "nixl"},
                 prefill={"replicas": 2, "gpus": 2, "tensorParallel": 2, "nodeSelector": {"pool": "p"}},
                 decode={"replicas": 3, "gpus": 1, "nodeSelector": {"pool": "d"}})
    rs = render_ray.rayservice(spec, _owner())
    assert_kuberay_shape(rs)
    app = _serve(rs)["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_pd_openai_app"
    assert set(app["args"]) == {"prefill_config", "decode_config"}
    for role, replicas in (("prefill", 2), ("decode", 3)):
        cfg = app["args"][f"{role}_config"]
        assert cfg["engine_kwargs"]["kv_transfer_config"]["kv_connector"] == "NixlConnector"
        assert cfg["deployment_config"]["num_replicas"] == replicas
        assert cfg["deployment_config"]["request_router_config"]["request_router_class"] == render_ray.ROUTER_CLASS
        assert cfg["placement_group_config"]["bundle_per_worker"] == {"GPU": 1, f"kvpilot-{role}": 1}
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["prefill"]["resources"] == {"kvpilot-prefill": "2"}
    assert groups["prefill"]["template"]["spec"]["nodeSelector"] == {"pool": "p"}
    assert groups["decode"]["replicas"] == 3 and groups["decode"]["template"]["spec"]["nodeSelector"] == {"pool": "d"}


def test_autoscaling_leaves_sizing_to_ray_serve_and_kuberay_within_the_pool_bounds() -> None:
    spec = _spec(mode="aggregated", autoscaling={"enabled": True, "scaleDownStabilizationSeconds": 120},
                 decode={"replicas": 2, "minReplicas": 1, "maxReplicas": 4, "gpus": 16, "tensorParallel": 8,
                         "pipelineParallel": 2})
    rs = render_ray.rayservice(spec, _owner())
    cfg = _serve(rs)["applications"][0]["args"]["llm_configs"][0]["deployment_config"]
    assert "num_replicas" not in cfg
    assert cfg["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 2, "max_replicas": 4,
                                         "upscale_delay_s": 0, "downscale_delay_s": 120}
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 4, 8)   # × pipeline stages


def test_the_simulator_profile_serves_kvpilots_sim_app_on_the_head() -> None:
    from ray.serve.deployment import Application

    spec = _spec(mode="aggregated", engine={"type": "ray-serve", "profile": "h100-qwen2.5-0.5b"},
                 model={"name": "org/m", "servedName": "small"},
                 decode={"replicas": 3, "gpus": 0, "resources": {"requests": {"cpu": "3"}}})
    rs = render_ray.rayservice(spec, _owner())
    assert_kuberay_shape(rs)
    app = _serve(rs)["applications"][0]
    module, name = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    assert len(inspect.signature(builder).parameters) == 1   # what Serve requires of a builder
    assert isinstance(builder(app["args"]), Application)
    assert app["args"] == {"profile": "h100-qwen2.5-0.5b", "model": "small", "router": None}
    assert app["deployments"] == [{"name": "SimEngine", "num_replicas": 3,
                                   "request_router_config": render_ray.router_config(spec)}]
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["workerGroupSpecs"] == []
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"]["requests"]["cpu"] == "3" and "volumeMounts" not in head   # no /dev/shm for vLLM


def test_engine_args_become_engine_kwargs() -> None:
    assert render_ray.engine_kwargs_from_args(["--max-model-len", "4096", "--enforce-eager", "--dtype=half",
                                               "--gpu-memory-utilization", "0.8"]) == {
        "max_model_len": 4096, "enforce_eager": True, "dtype": "half", "gpu_memory_utilization": 0.8}


def test_pvc_models_are_mounted_and_loaded_from_the_claim() -> None:
    spec = _spec(mode="aggregated", model={"name": "m", "uri": "pvc://weights/llama"}, decode={"gpus": 1})
    rs = render_ray.rayservice(spec, _owner())
    llm = _serve(rs)["applications"][0]["args"]["llm_configs"][0]
    assert llm["model_loading_config"]["model_source"] == "/models/weights/llama"
    pod = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models/weights", "readOnly": True} in pod["containers"][0]["volumeMounts"]
