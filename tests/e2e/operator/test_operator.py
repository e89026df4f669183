"""The operator against the real control plane: children, GPU scheduling, status, scale, self-healing, deletion."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml

from kvpilot.procs import wait_for
from kvpilot.router.config import RouterConfig
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane

EXAMPLES = REPO_ROOT / "deploy" / "examples"
Get = Callable[..., Any]
Operator = Any  # conftest.Operator: start(), stop(), log_tail()


def _condition(obj: Any, type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def _ready(get: Get, name: str) -> bool:
    svc = get("llmservice", name)
    return bool(svc) and _condition(svc, "Ready").get("status") == "True"


def _apply(plane: ControlPlane, namespace: str, doc: dict[str, Any]) -> None:
    out = plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    assert out.returncode == 0, out.stderr


def test_simulator_example_is_served_scaled_healed_and_deleted(
        crds: ControlPlane, operator: Operator, namespace: str, kget: Get) -> None:
    out = crds.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / "simulator.yaml"))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: _ready(kget, "sim-llama-8b"), 90, f"LLMService Ready\n{operator.log_tail()}")

    svc = kget("llmservice", "sim-llama-8b")
    status = svc["status"]
    assert status["phase"] == "Ready" and status["observedGeneration"] == svc["metadata"]["generation"]
    assert not svc["metadata"].get("finalizers")  # deleting it never waits for the operator
    assert status["prefill"] == {"desired": 1, "replicas": 1, "ready": 1}
    assert status["decode"] == {"desired": 2, "replicas": 2, "ready": 2}
    assert status["endpoint"] == f"http://sim-llama-8b-router.{namespace}.svc:8000"
    pools = {p["metadata"]["name"]: p for p in kget("workerpools")["items"]}
    assert sorted(pools) == ["sim-llama-8b-decode", "sim-llama-8b-prefill"]
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == svc["metadata"]["uid"] for p in pools.values())
    deps = {d["metadata"]["name"] for d in kget("deployments")["items"]}
    assert deps == {"sim-llama-8b-prefill", "sim-llama-8b-decode", "sim-llama-8b-router"}
    services = {s["metadata"]["name"]: s for s in kget("services")["items"]}
    assert services["sim-llama-8b-decode"]["spec"]["clusterIP"] == "None"
    assert "admin" not in {p["name"] for p in services["sim-llama-8b-router"]["spec"]["ports"]}
    admin = kget("secret", "sim-llama-8b-router-admin")   # the router's admin token, made by the operator
    assert admin["data"]["token"] and admin["metadata"]["ownerReferences"][0]["uid"] == svc["metadata"]["uid"]
    rendered = kget("configmap", "sim-llama-8b-router")["data"]["router.yaml"]
    config = RouterConfig.model_validate(yaml.safe_load(rendered))
    model = config.models[0]
    assert model.name == "llama-8b" and model.policy == "dualmap" and model.discovery is not None
    assert model.discovery.namespace == namespace and set(model.discovery.pools) == {"prefill", "decode"}

    pods = kget("pods", "-l", "kvpilot.io/service=sim-llama-8b,app.kubernetes.io/component=engine")["items"]
    assert len(pods) == 3 and all(p["status"]["phase"] == "Running" for p in pods)
    for pod in pods:   # the simulator example runs on CPU: no GPU asked for
        assert "nvidia.com/gpu" not in json.dumps(pod["spec"]["containers"][0].get("resources", {}))
    routers = kget("pods", "-l", "kvpilot.io/service=sim-llama-8b,app.kubernetes.io/component=router")["items"]
    assert len(routers) == 2 and status["router"] == {"desired": 2, "replicas": 2, "ready": 2}
    budgets = {p["metadata"]["name"]: p["spec"] for p in kget("poddisruptionbudgets")["items"]}
    assert set(budgets) == {"sim-llama-8b-prefill", "sim-llama-8b-decode", "sim-llama-8b-router"}
    assert all(b["maxUnavailable"] == 1 for b in budgets.values())

    # kubectl scale goes through the WorkerPool's scale subresource; the Deployment follows and stays.
    out = crds.kubectl("scale", "-n", namespace, "workerpool", "sim-llama-8b-decode", "--replicas", "3")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: kget("deployment", "sim-llama-8b-decode")["spec"]["replicas"] == 3, 30, "Deployment at 3")
    wait_for(lambda: (kget("llmservice", "sim-llama-8b")["status"]["decode"] == {"desired": 3, "replicas": 3,
                                                                                 "ready": 3}), 60, "decode 3/3")
    old_hash = kget("deployment", "sim-llama-8b-router")["spec"]["template"]["metadata"]["annotations"]
    out = crds.kubectl("patch", "-n", namespace, "llmservice", "sim-llama-8b", "--type", "merge",
                       "-p", '{"spec": {"slo": {"ttftMs": 1500}}}')  # a spec change makes the operator reconcile
    assert out.returncode == 0, out.stderr
    wait_for(lambda: kget("llmservice", "sim-llama-8b")["status"]["observedGeneration"] == 2, 30, "generation 2")
    # ... and rolls out: the router's config changes, and so does its pod template (a new ReplicaSet).
    rendered = yaml.safe_load(kget("configmap", "sim-llama-8b-router")["data"]["router.yaml"])
    assert rendered["models"][0]["ttftMs"] == 1500
    new_hash = kget("deployment", "sim-llama-8b-router")["spec"]["template"]["metadata"]["annotations"]
    assert new_hash["kvpilot.io/config-hash"] != old_hash["kvpilot.io/config-hash"]
    assert kget("workerpool", "sim-llama-8b-decode")["spec"]["replicas"] == 3
    assert kget("deployment", "sim-llama-8b-decode")["spec"]["replicas"] == 3
    # An edit of spec.prefill.replicas (kopf's field handler) reaches the prefill pool, and only it.
    # Only an update does that: first wait until kopf has handled the service up to the last edit (a
    # create handler that kopf still retries, after a conflict on a loaded machine, sees later edits
    # as part of the creation).
    wait_for(lambda: '"ttftMs":1500' in (kget("llmservice", "sim-llama-8b")["metadata"].get("annotations") or {}).get(
        "kopf.kvpilot.io/last-handled-configuration", ""), 90, f"kopf at the last edit\n{operator.log_tail()}")
    out = crds.kubectl("patch", "-n", namespace, "llmservice", "sim-llama-8b", "--type", "merge",
                       "-p", '{"spec": {"prefill": {"replicas": 2}}}')
    assert out.returncode == 0, out.stderr
    wait_for(lambda: kget("workerpool", "sim-llama-8b-prefill")["spec"]["replicas"] == 2, 30,
             f"the prefill pool at 2\n{operator.log_tail()}")
    assert kget("workerpool", "sim-llama-8b-decode")["spec"]["replicas"] == 3

    # A manual edit of a managed field is reverted; a deleted child is recreated.
    out = crds.kubectl("scale", "-n", namespace, "deployment", "sim-llama-8b-decode", "--replicas", "1")
    assert out.returncode == 0, out.stderr
    old_uid = kget("deployment", "sim-llama-8b-prefill")["metadata"]["uid"]
    assert crds.kubectl("delete", "-n", namespace, "deployment", "sim-llama-8b-prefill").returncode == 0

    def healed() -> bool:
        prefill = kget("deployment", "sim-llama-8b-prefill")
        return (prefill is not None and prefill["metadata"]["uid"] != old_uid
                and kget("deployment", "sim-llama-8b-decode")["spec"]["replicas"] == 3)

    wait_for(healed, 30, f"the deleted Deployment recreated and the edit reverted\n{operator.log_tail()}")
    wait_for(lambda: _ready(kget, "sim-llama-8b"), 60, "Ready again")

    # A pool's PodDisruptionBudget is watched like its Deployment: deleted, it is back before any
    # periodic resync (which would also restore it) has run in between.
    for _ in range(3):   # a resync that happens to fall in the window proves nothing: try again
        resyncs = operator.log().count("periodic resync of")
        old_uid = kget("poddisruptionbudget", "sim-llama-8b-decode")["metadata"]["uid"]
        assert crds.kubectl("delete", "-n", namespace, "pdb", "sim-llama-8b-decode").returncode == 0
        wait_for(lambda gone=old_uid: (kget("poddisruptionbudget", "sim-llama-8b-decode") or {}).get(
            "metadata", {}).get("uid", gone) != gone, 30, f"the pool's PDB recreated\n{operator.log_tail()}")
        if operator.log().count("periodic resync of") == resyncs:
            break
    else:
        raise AssertionError("the PDB came back only with a periodic resync each time")

    # Children are adopted (kopf.adopt): one controlling owner reference that blocks the owner's
    # deletion until garbage collection has removed them, and the owner's labels, which follow a relabel.
    svc_ref = {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "name": "sim-llama-8b",
               "uid": svc["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    for kind in ("workerpool", "deployment", "service", "configmap", "role", "rolebinding", "serviceaccount",
                 "poddisruptionbudget"):
        assert kget(kind, "sim-llama-8b-router" if kind != "workerpool" else "sim-llama-8b-decode")[
            "metadata"]["ownerReferences"] == [svc_ref], kind
    pool = kget("workerpool", "sim-llama-8b-decode")
    assert kget("deployment", "sim-llama-8b-decode")["metadata"]["ownerReferences"] == [
        {**svc_ref, "kind": "WorkerPool", "name": "sim-llama-8b-decode", "uid": pool["metadata"]["uid"]}]
    assert crds.kubectl("label", "-n", namespace, "llmservice", "sim-llama-8b", "team=search").returncode == 0
    # (a pool's own children follow at the pool's next reconcile: a label does not move its generation)
    wait_for(lambda: all((kget(kind, name)["metadata"].get("labels") or {}).get("team") == "search"
                         for kind, name in (("deployment", "sim-llama-8b-router"),
                                            ("workerpool", "sim-llama-8b-decode"))), 30,
             f"the service's label on its router and pools\n{operator.log_tail()}")

    # Deleting the LLMService removes everything it created (garbage collection via owner references).
    assert crds.kubectl("delete", "-n", namespace, "llmservice", "sim-llama-8b", "--wait=true").returncode == 0

    def gone() -> bool:
        left = [kget(kind)["items"] for kind in ("workerpools", "deployments", "services", "configmaps",
                                                  "roles", "rolebindings", "serviceaccounts",
                                                  "poddisruptionbudgets", "secrets")]
        names = [o["metadata"]["name"] for items in left for o in items]
        return not any(n.startswith("sim-llama-8b") for n in names)

    wait_for(gone, 60, "every child garbage-collected")


def test_more_gpus_than_any_node_creates_children_that_wait(
        crds: ControlPlane, operator: Operator, namespace: str, kget: Get) -> None:
    doc = yaml.safe_load((EXAMPLES / "simulator-fake-gpus.yaml").read_text())
    doc["metadata"]["name"] = "huge"
    doc["spec"]["decode"]["gpus"] = 16
    _apply(crds, namespace, doc)

    def short() -> bool:
        return _condition(kget("llmservice", "huge"), "GPUCapacity").get("status") == "False"

    wait_for(short, 30, f"GPUCapacity=False\n{operator.log_tail()}")
    svc = kget("llmservice", "huge")
    cond = _condition(svc, "GPUCapacity")
    assert cond["reason"] == "InsufficientGPUCapacity"
    assert "decode 16" in cond["message"] and "largest node has 8" in cond["message"]
    assert svc["status"]["phase"] == "Progressing" and _condition(svc, "Degraded")["status"] == "False"
    # The children exist: the decode pods wait for a node with 16 GPUs, prefill (1 GPU) runs.
    assert sorted(p["metadata"]["name"] for p in kget("workerpools")["items"]) == ["huge-decode", "huge-prefill"]

    def decode_pending() -> bool:
        pods = kget("pods", "-l", "kvpilot.io/workerpool=huge-decode")["items"]
        return len(pods) == 2 and all(p["status"]["phase"] == "Pending" for p in pods)

    wait_for(decode_pending, 30, "decode pods Pending")
    wait_for(lambda: (kget("llmservice", "huge")["status"].get("prefill") or {}).get("ready") == 1, 60,
             "prefill ready meanwhile")

    # Fixing the spec rolls the pool onto the nodes there are.
    doc["spec"]["decode"]["gpus"] = 1
    _apply(crds, namespace, doc)
    wait_for(lambda: _ready(kget, "huge"), 60, "Ready after the fix")
    assert _condition(kget("llmservice", "huge"), "GPUCapacity")["status"] == "True"


def test_restart_mid_reconcile_converges_and_mode_switch_prunes(
        crds: ControlPlane, operator: Operator, namespace: str, kget: Get) -> None:
    doc = {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": "small"},
           "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
                    "engine": {"type": "simulator", "profile": "h100-qwen2.5-0.5b"},
                    "mode": "aggregated", "decode": {"replicas": 2, "gpus": 1}}}
    operator.stop()
    try:
        _apply(crds, namespace, doc)
        assert kget("workerpools")["items"] == []
    finally:
        operator.start()
    wait_for(lambda: _ready(kget, "small"), 60, f"Ready after the restart\n{operator.log_tail()}")
    assert [p["metadata"]["name"] for p in kget("workerpools")["items"]] == ["small-worker"]
    assert kget("llmservice", "small")["status"]["decode"]["ready"] == 2

    doc["spec"]["mode"] = "disaggregated"
    _apply(crds, namespace, doc)

    def switched() -> bool:
        names = sorted(p["metadata"]["name"] for p in kget("workerpools")["items"])
        return names == ["small-decode", "small-prefill"] and kget("deployment", "small-worker") is None

    wait_for(switched, 60, "prefill and decode pools replacing the aggregated one")
    wait_for(lambda: _ready(kget, "small"), 60, "Ready in disaggregated mode")
    args = kget("deployment", "small-decode")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["sim", "serve", "--profile", "h100-qwen2.5-0.5b"]
    assert kget("llmservice", "small")["status"]["prefill"]["desired"] == 1

    doc["spec"]["mode"] = "aggregated"   # and back: no prefill counts are left in the status
    _apply(crds, namespace, doc)
    wait_for(lambda: [p["metadata"]["name"] for p in kget("workerpools")["items"]] == ["small-worker"], 60,
             "the aggregated pool replacing prefill and decode")

    def current() -> bool:   # the status of this spec, not the disaggregated one's (it was Ready too)
        svc = kget("llmservice", "small")
        return bool(svc["status"].get("observedGeneration") == svc["metadata"]["generation"] and _ready(kget, "small"))

    wait_for(current, 60, f"Ready in aggregated mode again\n{operator.log_tail()}")
    status = kget("llmservice", "small")["status"]
    assert "prefill" not in status and status["decode"]["desired"] == 2


def test_killed_mid_burst_converges_without_duplicates(
        crds: ControlPlane, operator: Operator, namespace: str, kget: Get) -> None:
    names = [f"burst-{i:02d}" for i in range(20)]
    docs = [{"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": name},
             "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
                      "engine": {"type": "simulator", "profile": "h100-qwen2.5-0.5b"},
                      "mode": "aggregated", "decode": {"replicas": 1, "gpus": 0}}} for name in names]
    # SIGKILL the operator (no cleanup, no goodbye) as soon as it has started on the burst: at the
    # first WorkerPool's watch event. It reconciles one object at a time until then, or 16 at once
    # could all be done by the time the event arrives.
    operator.stop()
    default_args = operator.args
    operator.args = (*default_args, "--max-workers", "1")
    try:
        operator.start()
    finally:
        operator.args = default_args   # the restart after the kill runs the default
    assert crds.apply_until_first(namespace, docs, "workerpools"), f"no WorkerPool\n{operator.log_tail()}"
    operator.kill()
    at_kill = {d["metadata"]["name"] for d in kget("deployments")["items"]}
    assert len(at_kill) < 2 * len(names), "the burst was done before the kill; make it bigger"
    operator.start()
    wait_for(lambda: all(_ready(kget, name) for name in names), 120, f"all Ready after the restart\n"
             f"{operator.log_tail()}")
    pools = sorted(p["metadata"]["name"] for p in kget("workerpools")["items"])
    assert pools == [f"{name}-worker" for name in names]
    deployments = sorted(d["metadata"]["name"] for d in kget("deployments")["items"])
    assert deployments == sorted([f"{name}-worker" for name in names] + [f"{name}-router" for name in names])
    for name in names:
        status = kget("llmservice", name)["status"]
        assert status["decode"] == {"desired": 1, "replicas": 1, "ready": 1} and status["router"]["ready"] == 2
