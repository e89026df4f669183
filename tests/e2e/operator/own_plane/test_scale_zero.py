"""Scale to zero and back on the real API: a disaggregated LLMService whose pools are at zero,
its router and engines run as processes by the test's process kubelet, and the autoscaler. The
first request waits in the router while both pools wake (one cold start, no error), and both go
back to zero after the stabilisation window."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

from kvpilot.procs import ManagedProcess, wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane, pod_states
from kvpilot.testing.kubelet import ProcessKubelet

Get = Callable[..., Any]
AT_ZERO = {"replicas": 0, "minReplicas": 0, "maxReplicas": 1, "gpus": 1}
SERVICE = {
    "apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": "zero"},
    "spec": {
        "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "servedName": "tiny"},
        "engine": {"type": "simulator", "profile": "h100-qwen2.5-0.5b"},
        "mode": "disaggregated", "prefill": AT_ZERO, "decode": AT_ZERO,
        "routing": {"policy": "least-loaded", "replicas": 1},
        "autoscaling": {"enabled": True, "scaleDownStabilizationSeconds": 3},
    },
}


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_both_pools_wake_for_the_first_request_and_go_back_to_zero(
        crds: ControlPlane, operator: Any, namespace: str, kget: Get, tmp_path: Path) -> None:
    out = crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(SERVICE))
    assert out.returncode == 0, out.stderr
    for pool in ("zero-prefill", "zero-decode"):
        wait_for(lambda pool=pool: kget("workerpool", pool) is not None, 60, f"the WorkerPool {pool}")
    argv = [sys.executable, "-P", "-m", "kvpilot.cli", "autoscaler", "run", "-n", namespace, "--interval", "1",
            "--cold-start", "2", "--log-format", "text"]
    with ProcessKubelet(crds, namespace, "kvpilot.io/service=zero", tmp_path) as kubelet:
        wait_for(lambda: any(_up(u) for u in kubelet.routers.values()), 60, "the router process")
        router = next(u for u in kubelet.routers.values() if _up(u))
        assert kubelet.urls == {}                           # no engine: both pools at zero
        scaler = ManagedProcess("autoscaler", argv, tmp_path / "autoscaler.log", env=crds.env(), cwd=REPO_ROOT)
        try:
            client = openai.OpenAI(base_url=router + "/v1", api_key="none", max_retries=0, timeout=80)
            try:
                answer = client.completions.create(model="tiny", prompt="hello from zero", max_tokens=4)
            except openai.APIError as e:   # say where the wake stopped: autoscaler, kubelet or router
                pools = {p: (kget("workerpool", p) or {}).get("spec") for p in ("zero-prefill", "zero-decode")}
                deployments = {d["metadata"]["name"]: (d["spec"].get("replicas"), d.get("status"))
                               for d in kget("deployments")["items"]}
                pods = pod_states(kget("pods")["items"])
                raise AssertionError(f"{e!r}\npools: {pools}\ndeployments: {deployments}\npods: {pods}\n"
                                     f"autoscaler:\n{scaler.log_tail()}\n{kubelet.describe()}") from None
            assert answer.choices[0].text                   # held through one cold start, then served
            log = scaler.log_path.read_text()
            for role in ("prefill", "decode"):
                assert f"zero {role}: 0 → 1: wake from zero" in log, log[-3000:]

            def both_at_zero() -> bool:
                return all(kget("workerpool", p)["spec"]["replicas"] == 0 for p in ("zero-prefill", "zero-decode"))

            wait_for(both_at_zero, 60, f"both pools back at zero\n{scaler.log_tail()}")
            assert scaler.alive()
        finally:
            scaler.stop()
