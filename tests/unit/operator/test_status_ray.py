"""Status of `engine.type: ray-serve` services: the RayService's readiness as the LLMService's
conditions, and the spec checks a Ray Serve LLM replica needs."""

from __future__ import annotations

from typing import Any

from kvpilot.crds import LLMServiceSpec
from kvpilot.operator.status import gpu_capacity, llmservice_status, rayservice_waiting, spec_problems

SVC: dict[str, Any] = {"metadata": {"name": "big", "namespace": "ns", "generation": 2}}
SPEC = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "ray-serve"}, "mode": "aggregated",
                                      "decode": {"gpus": 16, "tensorParallel": 8, "pipelineParallel": 2}})


def _rayservice(status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "big"}, "status": status}


def _cond(status: Any, type_: str) -> Any:
    return next(c for c in status.conditions if c.type == type_)


def test_ray_serve_is_supported_and_checks_the_replica_size() -> None:
    assert spec_problems(SPEC, []) == []
    wrong = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "ray-serve"},
                                           "mode": "aggregated",
                                           "decode": {"gpus": 32, "tensorParallel": 8, "pipelineParallel": 2}})
    problems = spec_problems(wrong, [])
    assert [p.reason for p in problems] == ["InvalidParallelism"]
    assert "aggregated: gpus 32, tensorParallel 8 × pipelineParallel 2" in problems[0].message
    pd_sim = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "ray-serve",
                                                                               "profile": "h100-llama3-8b"}})
    assert [p.reason for p in spec_problems(pd_sim, ["h100-llama3-8b"])] == ["UnsupportedMode"]


def test_gpu_capacity_counts_one_pipeline_stage_per_node() -> None:
    assert gpu_capacity(SPEC, max_node_gpus=8) is None   # 16 GPUs a replica, 8 a pod
    short = gpu_capacity(SPEC, max_node_gpus=4)
    assert short is not None and short.reason == "InsufficientGPUCapacity" and "aggregated 8" in short.message


def test_rayservice_waiting_reads_kuberays_ready_condition_and_app_statuses() -> None:
    assert rayservice_waiting(None) == "RayService not created"
    assert rayservice_waiting(_rayservice({})) == "RayService not ready"
    ready = {"conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"}]}
    assert rayservice_waiting(_rayservice(ready)) is None
    assert rayservice_waiting(_rayservice({"serviceStatus": "Running"})) is None   # before KubeRay 1.3
    deploying = {"conditions": [{"type": "Ready", "status": "False", "reason": "Initializing",
                                 "message": "waiting for the cluster"}],
                 "serviceStatus": "Running",   # ignored once KubeRay writes the condition
                 "pendingServiceStatus": {"applicationStatuses": {"llm": {"status": "DEPLOYING",
                                                                          "message": "pulling"}}}}
    assert rayservice_waiting(_rayservice(deploying)) == (
        "RayService not ready (Initializing: waiting for the cluster) (app llm DEPLOYING: pulling)")


def test_llmservice_reports_the_rayservice_readiness() -> None:
    waiting = llmservice_status(SVC, SPEC, [], [], None, "T1", rayservice=_rayservice({}))
    assert waiting.phase == "Progressing" and waiting.router is None and waiting.decode is None
    assert _cond(waiting, "Ready").status == "False" and _cond(waiting, "Ready").reason == "RayServiceNotReady"
    assert _cond(waiting, "Progressing").message == "RayService not ready"
    assert waiting.endpoint == "http://big-serve-svc.ns.svc:8000"   # KubeRay's Serve Service, not a router
    serving = _rayservice({"conditions": [{"type": "Ready", "status": "True"}]})
    ready = llmservice_status({**SVC, "status": waiting.wire()}, SPEC, [], [], None, "T2", rayservice=serving)
    assert ready.phase == "Ready" and _cond(ready, "Ready").reason == "RayServiceReady"
    assert _cond(ready, "Ready").last_transition_time == "T2" and _cond(ready, "Degraded").status == "False"
