"""Status and conditions from children, and the checks only the cluster can answer."""

from __future__ import annotations

from typing import Any

from kvpilot.crds import LLMServiceSpec
from kvpilot.operator.status import Problem, llmservice_status, spec_problems, workerpool_status

SVC: dict[str, Any] = {"metadata": {"name": "s", "namespace": "ns", "generation": 4}}
SPEC = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "simulator"},
                                      "prefill": {"gpus": 1}, "decode": {"gpus": 1, "replicas": 2}})


def _pool(role: str, desired: int, ready: int) -> dict[str, Any]:
    return {"metadata": {"name": f"s-{role}", "generation": 1}, "spec": {"role": role, "replicas": desired},
            "status": {"replicas": desired, "readyReplicas": ready, "observedGeneration": 1}}


def _conds(status: Any) -> dict[str, str]:
    return {c.type: c.status for c in status.conditions}


def test_more_gpus_than_any_node_is_a_problem_with_a_message() -> None:
    spec = LLMServiceSpec.model_validate({"model": {"name": "m"}, "decode": {"gpus": 16}})
    problems = spec_problems(spec, max_node_gpus=8, known_profiles=[])
    assert [p.reason for p in problems] == ["InsufficientGPUCapacity"]
    assert "16 nvidia.com/gpu" in problems[0].message and "largest node has 8" in problems[0].message
    assert spec_problems(spec, max_node_gpus=16, known_profiles=[]) == []


def test_unknown_simulator_profile_and_ray_serve_are_problems() -> None:
    sim = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "simulator", "profile": "x"}})
    assert [p.reason for p in spec_problems(sim, 8, ["h100-llama3-8b"])] == ["UnknownProfile"]
    ray = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "ray-serve"}})
    assert [p.reason for p in spec_problems(ray, 8, [])] == ["UnsupportedEngine"]


def test_ready_when_every_pool_and_the_router_are_ready() -> None:
    router = {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}}
    status = llmservice_status(SVC, SPEC, [], [_pool("prefill", 1, 1), _pool("decode", 2, 2)], router, "T1")
    assert status.phase == "Ready" and _conds(status) == {"Ready": "True", "Progressing": "False",
                                                          "Degraded": "False"}
    assert status.decode is not None and (status.decode.desired, status.decode.ready) == (2, 2)
    assert status.observed_generation == 4 and status.endpoint == "http://s-router.ns.svc:8000"


def test_progressing_names_what_is_missing_and_keeps_transition_times() -> None:
    first = llmservice_status(SVC, SPEC, [], [_pool("prefill", 1, 1), _pool("decode", 2, 1)], None, "T1")
    assert first.phase == "Progressing"
    ready = next(c for c in first.conditions if c.type == "Ready")
    assert "decode 1/2 ready" in ready.message and "router not ready" in ready.message
    again = llmservice_status({**SVC, "status": first.wire()}, SPEC, [], [_pool("prefill", 1, 1),
                                                                          _pool("decode", 2, 1)], None, "T2")
    assert again == first  # nothing changed, so nothing to write (and no transition time moves)


def test_degraded_carries_the_problem() -> None:
    status = llmservice_status(SVC, SPEC, [Problem("InsufficientGPUCapacity", "too big")], [], None, "T1")
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert status.phase == "Degraded" and degraded.status == "True" and degraded.message == "too big"


def test_workerpool_status_feeds_the_scale_subresource() -> None:
    pool = {"metadata": {"name": "s-decode", "generation": 2}, "spec": {"replicas": 3}}
    dep = {"status": {"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3}}
    status = workerpool_status(pool, dep, "T1")
    assert (status.replicas, status.ready_replicas, status.selector) == (3, 2, "kvpilot.io/workerpool=s-decode")
    assert status.conditions[0].status == "False" and status.observed_generation == 2
