"""GPU capacity is a condition, not a gate: on a cluster whose GPU node pool is at zero (as
cluster-autoscaler or Karpenter leave it until Pending pods ask), an LLMService's children are all
created, its engine pods wait Pending, `GPUCapacity=False` says why, and a GPU node joining runs them.

Its own control plane: the session's has GPU nodes from the start, and this test needs a cluster
without any until it adds one."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import yaml

from kvpilot.procs import wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane

EXAMPLES = REPO_ROOT / "deploy" / "examples"


def _get(plane: ControlPlane, ns: str, *args: str) -> Any:
    out = plane.kubectl("get", "-n", ns, *args, "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _condition(svc: Any, type_: str) -> dict[str, Any]:
    return next((c for c in (svc.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def _engine_pods(plane: ControlPlane, ns: str, name: str) -> list[Any]:
    items: list[Any] = _get(plane, ns, "pods", "-l", f"kvpilot.io/service={name},app.kubernetes.io/component=engine")[
        "items"]
    return items


def test_no_gpu_node_creates_children_pending_then_a_gpu_node_runs_them(
        cpu_only: ControlPlane, operator_on: Callable[..., Any]) -> None:
    op = operator_on(cpu_only)
    ns = f"gpu-{uuid.uuid4().hex[:6]}"
    assert cpu_only.kubectl("create", "namespace", ns).returncode == 0
    doc = yaml.safe_load((EXAMPLES / "simulator-fake-gpus.yaml").read_text())
    name = doc["metadata"]["name"]
    out = cpu_only.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))
    assert out.returncode == 0, out.stderr

    def gpu_condition_false() -> bool:
        return _condition(_get(cpu_only, ns, "llmservice", name), "GPUCapacity").get("status") == "False"

    wait_for(gpu_condition_false, 60, f"GPUCapacity=False\n{op.log_tail()}")
    svc = _get(cpu_only, ns, "llmservice", name)
    cond = _condition(svc, "GPUCapacity")
    assert cond["reason"] == "NoGPUNodes" and "Pending" in cond["message"]
    assert "prefill 1, decode 1" in cond["message"]
    assert svc["status"]["phase"] == "Progressing"   # not Degraded: nothing is wrong with the spec
    assert _condition(svc, "Degraded")["status"] == "False"

    # Every child exists although no node can run an engine.
    pools = sorted(p["metadata"]["name"] for p in _get(cpu_only, ns, "workerpools")["items"])
    assert pools == [f"{name}-decode", f"{name}-prefill"]
    # The pools' own children come from the pools' reconciles, which may still be applying them.
    children = {f"{name}-prefill", f"{name}-decode", f"{name}-router"}
    for kind in ("deployments", "poddisruptionbudgets"):
        wait_for(lambda k=kind: {o["metadata"]["name"] for o in _get(cpu_only, ns, k)["items"]} == children, 30,
                 f"{kind} of both pools and the router\n{op.log_tail()}")

    def engines_pending() -> bool:
        pods = _engine_pods(cpu_only, ns, name)
        return len(pods) == 3 and all(p["status"]["phase"] == "Pending" for p in pods)

    wait_for(engines_pending, 60, "3 engine pods Pending")
    for pod in _engine_pods(cpu_only, ns, name):
        sched = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
        assert sched["status"] == "False" and "nvidia.com/gpu" in sched["message"], sched
    # The routers ask for no GPU and run on the CPU node meanwhile.
    wait_for(lambda: _get(cpu_only, ns, "deployment", f"{name}-router")["status"].get("readyReplicas") == 2,
             60, "both routers ready on the CPU node")

    # A GPU node joins (what the node autoscaler does for the Pending pods): they run there.
    [gpu_node] = cpu_only.add_gpu_nodes(1, gpus=8)

    def running() -> bool:
        pods = _engine_pods(cpu_only, ns, name)
        return len(pods) == 3 and all(p["status"]["phase"] == "Running" and p["spec"].get("nodeName") == gpu_node
                                      for p in pods)

    wait_for(running, 90, f"engine pods Running on {gpu_node}")

    def ready() -> bool:
        svc = _get(cpu_only, ns, "llmservice", name)
        return (_condition(svc, "Ready").get("status") == "True"
                and _condition(svc, "GPUCapacity").get("status") == "True")

    wait_for(ready, 90, f"Ready with GPUCapacity=True\n{op.log_tail()}")
