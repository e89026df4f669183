"""Honest under GPU shortage, on the real API: a pool pinned to a kwok node with 2 GPUs, under
load the autoscaler wants more replicas than fit. Pods past the Pending deadline count as no GPU
for them: the asked size stops growing, `status.autoscaling` says "waiting for GPUs: N", and the
operator's GPUCapacity condition says the same."""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvpilot.procs import ManagedProcess, free_port, wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane
from kvpilot.testing.kubelet import ProcessKubelet
from kvpilot.testing.load import another_decision, load_until

Get = Callable[..., Any]
TAINT = "kvpilot.io/test-shortage"
MAX = 12


def _service(node: str) -> dict[str, Any]:
    return {
        "apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": "short"},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
            "engine": {"type": "simulator", "profile": "h100-llama3-8b"},
            "mode": "aggregated",
            "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": MAX, "gpus": 1,
                       "nodeSelector": {"kubernetes.io/hostname": node},
                       "tolerations": [{"key": TAINT, "operator": "Exists", "effect": "NoSchedule"}]},
            "slo": {"ttftMs": 300, "tpotMs": 100},
            "autoscaling": {"enabled": True, "scaleDownStabilizationSeconds": 600},
        },
    }


def _pending(kget: Get) -> int:
    pods = kget("pods", "-l", "kvpilot.io/service=short,app.kubernetes.io/component=engine")["items"]
    return sum(1 for p in pods if p["status"].get("phase") == "Pending" and not p["metadata"].get("deletionTimestamp"))


def test_a_gpu_short_pool_stops_asking_and_says_how_many_wait(
        crds: ControlPlane, operator: Any, namespace: str, kget: Get, tmp_path: Path) -> None:
    [node] = crds.add_gpu_nodes(1, gpus=2, prefix=f"short-{namespace}")
    out = crds.kubectl("taint", "node", node, f"{TAINT}=yes:NoSchedule")   # only this test's pods land there
    assert out.returncode == 0, out.stderr
    out = crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_service(node)))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: kget("workerpool", "short-worker") is not None, 60, "the WorkerPool")
    port = free_port()
    argv = [sys.executable, "-P", "-m", "kvpilot.cli", "autoscaler", "run", "-n", namespace, "--interval", "1",
            "--cold-start", "2", "--pending-deadline", "2", "--metrics-port", str(port), "--log-format", "text"]
    selector = "kvpilot.io/service=short,app.kubernetes.io/component=engine"
    stop = threading.Event()
    with ProcessKubelet(crds, namespace, selector, tmp_path) as kubelet:
        wait_for(lambda: len(kubelet.urls) == 1, 60, "the first worker process")
        scaler = ManagedProcess("autoscaler", argv, tmp_path / "autoscaler.log", env=crds.env(), cwd=REPO_ROOT)
        clients = [threading.Thread(target=load_until, args=(lambda: kubelet.urls.values(), "llama-8b", stop),
                                    daemon=True) for _ in range(6)]
        try:
            for c in clients:
                c.start()

            def reason() -> str:
                status = (kget("llmservice", "short").get("status") or {}).get("autoscaling") or {}
                return str((status.get("aggregated") or {}).get("reason", ""))

            wait_for(lambda: reason().startswith("waiting for GPUs"), 60, f"the shortage\n{scaler.log_tail()}")
            asked = kget("workerpool", "short-worker")["spec"]["replicas"]
            assert 2 < asked < MAX

            def says_how_many() -> bool:   # the count is the pods Pending now (read twice: it is live)
                m = re.match(r"waiting for GPUs: (\d+) replica", reason())
                now_asked = kget("workerpool", "short-worker")["spec"]["replicas"]
                return m is not None and int(m.group(1)) == _pending(kget) == now_asked - 2 > 0

            wait_for(says_how_many, 30, f"the count of waiting replicas\n{scaler.log_tail()}")
            # No runaway: demand still exceeds what runs, yet decision after decision nothing more is asked.
            for _ in range(5):
                another_decision(port)
                assert kget("workerpool", "short-worker")["spec"]["replicas"] <= asked

            def condition() -> dict[str, Any]:
                conds = (kget("llmservice", "short").get("status") or {}).get("conditions") or []
                return next((c for c in conds if c["type"] == "GPUCapacity"), {})

            wait_for(lambda: condition().get("reason") == "WaitingForGPUs", 40,
                     f"the GPUCapacity condition\n{operator.log_tail()}")
            assert condition()["status"] == "False" and "waiting for GPUs: " in condition()["message"]
            assert kget("workerpool", "short-worker")["spec"]["replicas"] <= asked
        finally:
            stop.set()
            scaler.stop()
            for c in clients:
                c.join(timeout=40)
    crds.kubectl("delete", "node", node, "--wait=false")
