"""The autoscaler end to end on the real API: operator, autoscaler and simulator workers as real
processes (kwok pods run by the test's process kubelet at their 127.64.x IPs), load from a test
client, and the WorkerPool and its Deployment following the autoscaler up and back down."""

from __future__ import annotations

import json
import sys
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvpilot.procs import ManagedProcess, free_port, wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane
from kvpilot.testing.kubelet import ProcessKubelet
from kvpilot.testing.load import load_until

Get = Callable[..., Any]

SERVICE = {
    "apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": "auto"},
    "spec": {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
        "engine": {"type": "simulator", "profile": "h100-llama3-8b"},
        "mode": "aggregated",
        "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3, "gpus": 1},
        "slo": {"ttftMs": 300, "tpotMs": 100},
        "autoscaling": {"enabled": True, "scaleDownStabilizationSeconds": 8},
    },
}
def test_autoscaler_scales_a_workerpool_up_under_load_and_back_down(
        crds: ControlPlane, operator: Any, namespace: str, kget: Get, tmp_path: Path) -> None:
    out = crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(SERVICE))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: kget("workerpool", "auto-worker") is not None, 60, "the WorkerPool")
    selector = "kvpilot.io/service=auto,app.kubernetes.io/component=engine"
    metrics_port = free_port()
    argv = [sys.executable, "-P", "-m", "kvpilot.cli", "autoscaler", "run", "-n", namespace, "--interval", "2",
            "--cold-start", "4", "--metrics-port", str(metrics_port), "--log-format", "text", "--log-level", "DEBUG"]
    with ProcessKubelet(crds, namespace, selector, tmp_path) as kubelet:
        wait_for(lambda: len(kubelet.urls) == 1, 60, "the first worker process")
        scaler = ManagedProcess("autoscaler", argv, tmp_path / "autoscaler.log", env=crds.env(), cwd=REPO_ROOT)
        stop = threading.Event()
        clients = [threading.Thread(target=load_until, args=(lambda: kubelet.urls.values(), "llama-8b", stop),
                                    daemon=True) for _ in range(6)]
        try:
            for c in clients:
                c.start()
            wait_for(lambda: kget("workerpool", "auto-worker")["spec"]["replicas"] >= 2, 60,
                     f"a scale-up\n{scaler.log_tail()}")
            wait_for(lambda: kget("deployment", "auto-worker")["spec"]["replicas"] >= 2, 30, "the Deployment")
            wait_for(lambda: len(kubelet.urls) >= 2, 60, "a second worker process")
            status = kget("llmservice", "auto")["status"]["autoscaling"]["aggregated"]
            assert status["desired"] >= 2 and status["reason"], status
            assert status["metricsSource"] == "pods", status     # the default: scraped from the pods
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
                metrics = resp.read().decode()
            ups = [line for line in metrics.splitlines()
                   if line.startswith("kvpilot_autoscaler_decisions_total{") and 'action="up"' in line]
            assert ups and float(ups[0].rsplit(" ", 1)[1]) >= 1, metrics[-2000:]

            stop.set()
            for c in clients:
                c.join(timeout=40)
            # No load: after the stabilisation window the pool shrinks back to its minimum, and the
            # pods were ranked for removal first.
            wait_for(lambda: kget("workerpool", "auto-worker")["spec"]["replicas"] == 1, 90,
                     f"the scale-down\n{scaler.log_tail()}")
            wait_for(lambda: kget("deployment", "auto-worker")["spec"]["replicas"] == 1, 30, "the Deployment")
            pods = kget("pods", "-l", selector)["items"]
            assert any("controller.kubernetes.io/pod-deletion-cost" in (p["metadata"].get("annotations") or {})
                       for p in pods)
            assert scaler.alive
        finally:
            stop.set()
            scaler.stop()
