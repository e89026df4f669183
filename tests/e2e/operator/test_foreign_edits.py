"""An edit the operator's apply cannot take back (`kubectl rollout restart` owns an annotation the
operator never renders) is answered with one re-apply, not one on every later event of the object.
Before `reconcile.Answered` each status change of the rolling router Deployment re-applied every
router object. About 40 s."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from kvpilot.procs import free_port, wait_for
from kvpilot.testing.k8s import ControlPlane

Operator = Any  # conftest.Operator

SERVICE = {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": "edited"},
           "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
                    "engine": {"type": "simulator", "profile": "h100-qwen2.5-0.5b"},
                    "mode": "aggregated", "decode": {"replicas": 1, "gpus": 0}}}


def _config_applies(port: int) -> float:
    """How often the operator has applied a ConfigMap: once per full reconcile of a service (the
    router's config), never for a status refresh."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(r'kvpilot_operator_api_requests_total\{method="PATCH",resource="configmaps"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def _settled(port: int) -> float:
    """The count once it has not moved for 3 s."""
    last: list[tuple[float, float]] = []   # (since, value)

    def still() -> bool:
        value = _config_applies(port)
        if not last or last[0][1] != value:
            last[:] = [(time.monotonic(), value)]
        return time.monotonic() - last[0][0] >= 3

    wait_for(still, 60, "the operator to go quiet")
    return last[0][1]


def test_a_rollout_restart_is_answered_once_not_on_every_event(
        crds: ControlPlane, namespace: str, make_operator: Callable[..., Operator], kget: Callable[..., Any]) -> None:
    port = free_port()
    op = make_operator("--standalone", "-n", namespace, "--metrics-port", str(port), "--resync-seconds", "3600",
                       name="edits-operator")   # no periodic resync in the window: it applies the config too
    op.start()
    out = crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(SERVICE))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: ((kget("llmservice", "edited") or {}).get("status") or {}).get("phase") == "Ready", 90,
             f"LLMService Ready\n{op.log_tail()}")
    for restart in (1, 2):   # the second restart is a new edit: answered again, once
        before = _settled(port)
        generation = kget("deployment", "edited-router")["metadata"]["generation"]
        out = crds.kubectl("rollout", "restart", "-n", namespace, "deployment/edited-router")
        assert out.returncode == 0, out.stderr
        out = crds.kubectl("rollout", "status", "-n", namespace, "deployment/edited-router", "--timeout=60s")
        assert out.returncode == 0, out.stdout + out.stderr
        after = _settled(port)
        dep = kget("deployment", "edited-router")
        assert dep["metadata"]["generation"] == generation + 1   # rolled once: the operator did not undo it
        assert "kubectl.kubernetes.io/restartedAt" in dep["spec"]["template"]["metadata"]["annotations"]
        assert after - before == 1, f"restart {restart}: {after - before:.0f} full reconciles\n{op.log_tail()}"
