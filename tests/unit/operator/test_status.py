"""Status and conditions from children, and the checks only the cluster can answer."""

from __future__ import annotations

from typing import Any

from kvpilot.crds import LLMServiceSpec
from kvpilot.operator.status import (
    Problem,
    gpu_capacity,
    llmservice_status,
    spec_problems,
    status_patch,
    workerpool_status,
)

SVC: dict[str, Any] = {"metadata": {"name": "s", "namespace": "ns", "generation": 4}}
SPEC = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "simulator"},
                                      "prefill": {"gpus": 1}, "decode": {"gpus": 1, "replicas": 2}})


def _pool(role: str, desired: int, ready: int) -> dict[str, Any]:
    return {"metadata": {"name": f"s-{role}", "generation": 1}, "spec": {"role": role, "replicas": desired},
            "status": {"replicas": desired, "readyReplicas": ready, "observedGeneration": 1}}


def _conds(status: Any) -> dict[str, str]:
    return {c.type: c.status for c in status.conditions}


def test_gpu_capacity_says_why_pods_wait_without_making_it_a_spec_problem() -> None:
    spec = LLMServiceSpec.model_validate({"model": {"name": "m"}, "prefill": {"gpus": 2, "tensorParallel": 2},
                                          "decode": {"gpus": 16}})
    assert spec_problems(spec, known_profiles=[]) == []   # nothing is held back for capacity
    none = gpu_capacity(spec, max_node_gpus=0)
    assert none is not None and none.reason == "NoGPUNodes"
    assert "prefill 2, decode 16" in none.message and "Pending" in none.message
    small = gpu_capacity(spec, max_node_gpus=8)
    assert small is not None and small.reason == "InsufficientGPUCapacity"
    assert "largest node has 8" in small.message and "decode 16" in small.message and "prefill" not in small.message
    assert gpu_capacity(spec, max_node_gpus=16) is None
    cpu = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "simulator"},
                                         "prefill": {"gpus": 0}, "decode": {"gpus": 0}})
    assert gpu_capacity(cpu, max_node_gpus=0) is None   # a simulator on CPU needs no GPU node


def test_missing_gpus_leave_the_service_progressing_with_a_false_gpu_condition() -> None:
    pending = [_pool("prefill", 1, 0), _pool("decode", 2, 0)]
    gpu = Problem("NoGPUNodes", "no node has allocatable nvidia.com/gpu")
    status = llmservice_status(SVC, SPEC, [], pending, None, "T1", gpu)
    assert status.phase == "Progressing"
    assert _conds(status) == {"Ready": "False", "Progressing": "True", "Degraded": "False", "GPUCapacity": "False"}
    cond = next(c for c in status.conditions if c.type == "GPUCapacity")
    assert (cond.reason, cond.message) == ("NoGPUNodes", gpu.message)
    router = {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}}
    later = llmservice_status({**SVC, "status": status.wire()}, SPEC, [], [_pool("prefill", 1, 1),
                                                                          _pool("decode", 2, 2)], router, "T2")
    assert later.phase == "Ready" and _conds(later)["GPUCapacity"] == "True"
    assert next(c for c in later.conditions if c.type == "GPUCapacity").last_transition_time == "T2"


def test_unknown_simulator_profile_is_a_problem() -> None:
    sim = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "simulator", "profile": "x"}})
    assert [p.reason for p in spec_problems(sim, ["h100-llama3-8b"])] == ["UnknownProfile"]
    ray_sim = LLMServiceSpec.model_validate({"model": {"name": "m"}, "mode": "aggregated",
                                             "engine": {"type": "ray-serve", "profile": "x"}})
    assert [p.reason for p in spec_problems(ray_sim, ["h100-llama3-8b"])] == ["UnknownProfile"]


def test_ready_when_every_pool_and_the_router_are_ready() -> None:
    half = {"status": {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}}
    status = llmservice_status(SVC, SPEC, [], [_pool("prefill", 1, 1), _pool("decode", 2, 2)], half, "T1")
    assert status.phase == "Progressing" and status.router is not None and status.router.desired == 2
    assert "router 1/2 ready" in next(c for c in status.conditions if c.type == "Ready").message
    router = {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}}
    status = llmservice_status(SVC, SPEC, [], [_pool("prefill", 1, 1), _pool("decode", 2, 2)], router, "T1")
    assert status.phase == "Ready" and _conds(status) == {"Ready": "True", "Progressing": "False",
                                                          "Degraded": "False", "GPUCapacity": "True"}
    assert status.decode is not None and (status.decode.desired, status.decode.ready) == (2, 2)
    assert status.observed_generation == 4 and status.endpoint == "http://s-router.ns.svc:8000"


def test_progressing_names_what_is_missing_and_keeps_transition_times() -> None:
    first = llmservice_status(SVC, SPEC, [], [_pool("prefill", 1, 1), _pool("decode", 2, 1)], None, "T1")
    assert first.phase == "Progressing"
    ready = next(c for c in first.conditions if c.type == "Ready")
    assert "decode 1/2 ready" in ready.message and "router 0/2 ready" in ready.message
    again = llmservice_status({**SVC, "status": first.wire()}, SPEC, [], [_pool("prefill", 1, 1),
                                                                          _pool("decode", 2, 1)], None, "T2")
    assert again == first  # nothing changed, so nothing to write (and no transition time moves)


def test_degraded_carries_the_problem() -> None:
    status = llmservice_status(SVC, SPEC, [Problem("UnknownProfile", "no such profile")], [], None, "T1")
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert status.phase == "Degraded" and degraded.status == "True" and degraded.message == "no such profile"


def test_workerpool_status_feeds_the_scale_subresource() -> None:
    pool = {"metadata": {"name": "s-decode", "generation": 2}, "spec": {"replicas": 3}}
    dep = {"status": {"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3}}
    status = workerpool_status(pool, dep, "T1")
    assert (status.replicas, status.ready_replicas, status.selector) == (3, 2, "kvpilot.io/workerpool=s-decode")
    assert status.conditions[0].status == "False" and status.observed_generation == 2


def test_the_autoscalers_gpu_shortage_shows_as_the_gpu_condition_with_its_count() -> None:
    short = {"decode": {"desired": 4, "current": 4, "ready": 2, "lastDecisionTime": "T0",
                        "reason": "waiting for GPUs: 2 replica(s) unschedulable, 6 wanted; scale up: …"},
             "prefill": {"desired": 1, "current": 1, "ready": 1, "reason": "steady: …", "lastDecisionTime": "T0"}}
    status = llmservice_status({**SVC, "status": {"autoscaling": short}}, SPEC, [],
                               [_pool("prefill", 1, 1), _pool("decode", 4, 2)], None, "T1")
    cond = next(c for c in status.conditions if c.type == "GPUCapacity")
    assert cond.status == "False" and cond.reason == "WaitingForGPUs"
    assert cond.message.startswith("decode: waiting for GPUs: 2 replica(s)") and "prefill" not in cond.message
    short["decode"]["reason"] = "steady: …"     # GPUs freed: the condition clears
    again = llmservice_status({**SVC, "status": {"autoscaling": short}}, SPEC, [],
                              [_pool("prefill", 1, 1), _pool("decode", 4, 4)], None, "T2")
    assert _conds(again)["GPUCapacity"] == "True"


def test_going_aggregated_removes_the_prefill_counts_and_keeps_the_autoscalers_keys() -> None:
    router = {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}}
    before = llmservice_status(SVC, SPEC, [], [_pool("prefill", 1, 1), _pool("decode", 2, 2)], router, "T1").wire()
    old = {**before, "autoscaling": {"prefill": {"desired": 1, "reason": "steady"}}}
    aggregated = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "simulator"},
                                                "mode": "aggregated", "decode": {"gpus": 1, "replicas": 2}})
    svc = {**SVC, "status": old}
    after = llmservice_status(svc, aggregated, [], [_pool("aggregated", 2, 2)], router, "T2").wire()
    patch = status_patch(old, after)
    assert patch is not None and patch["prefill"] is None and "autoscaling" not in patch
    merged = {k: v for k, v in {**old, **patch}.items() if v is not None}   # what a JSON merge patch leaves
    assert "prefill" not in merged and merged["decode"] == {"desired": 2, "replicas": 2, "ready": 2}
    assert merged["autoscaling"] == old["autoscaling"]
    assert status_patch(merged, after) is None   # nothing to write once it matches
