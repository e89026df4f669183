"""PodMonitors: one per LLMService while the Prometheus Operator's CRDs exist, none (and no failure) without them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kvpilot.procs import wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane

MONITORING_CRDS = Path(__file__).parent / "prometheus-operator-crds.yaml"
Get = Callable[..., Any]
Operator = Any  # conftest.Operator


def _ready(get: Get, name: str) -> bool:
    svc = get("llmservice", name)
    return bool(svc) and any(c["type"] == "Ready" and c["status"] == "True"
                             for c in (svc.get("status") or {}).get("conditions", []))


def _failures(log: str, namespace: str) -> list[str]:
    """Log lines about this test's objects that report a failed handler or an error."""
    return [line for line in log.splitlines()
            if f"[{namespace}/" in line and (" failed with " in line or "[ERROR" in line)]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_pod_monitor_follows_the_prometheus_operator_crds(
        crds: ControlPlane, operator: Operator, namespace: str, kget: Get) -> None:
    assert crds.kubectl("get", "crd", "podmonitors.monitoring.coreos.com").returncode != 0, "CRDs left over"
    start = len(operator.log())  # the session's operator: earlier tests wrote the start of its log
    doc = yaml.safe_load((REPO_ROOT / "deploy" / "examples" / "simulator.yaml").read_text())
    doc["metadata"]["name"] = "mon"
    out = crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    assert out.returncode == 0, out.stderr
    # Without the CRDs the service is served all the same and no PodMonitor is even tried.
    wait_for(lambda: _ready(kget, "mon"), 90, f"Ready without the Prometheus Operator\n{operator.log_tail()}")
    assert "podmonitor" not in operator.log()[start:].lower(), operator.log_tail()
    assert not _failures(operator.log()[start:], namespace), operator.log_tail()

    try:
        out = crds.kubectl("apply", "-f", str(MONITORING_CRDS))
        assert out.returncode == 0, out.stderr
        crds.kubectl("wait", "--for=condition=Established", "--timeout=30s", "crd/podmonitors.monitoring.coreos.com")
        # The periodic resync (20 s in these tests) notices the new API and adds the monitor.
        try:
            wait_for(lambda: kget("podmonitor", "mon") is not None, 90, "the PodMonitor")
        except TimeoutError:
            raise AssertionError(f"no PodMonitor after 90 s\n{operator.log_tail()}") from None
        monitor = kget("podmonitor", "mon")
        svc = kget("llmservice", "mon")
        assert monitor["metadata"]["ownerReferences"][0]["uid"] == svc["metadata"]["uid"]
        assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics"}]
        # The selector picks exactly this service's engine and router pods, each with an `http` port.
        selector = monitor["spec"]["selector"]["matchLabels"]
        pods = kget("pods")["items"]
        picked = [p for p in pods if _matches(selector, p["metadata"]["labels"])]
        components = sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in picked)
        assert components == ["engine", "engine", "engine", "router", "router"]
        for pod in picked:
            assert any(port.get("name") == "http" for port in pod["spec"]["containers"][0]["ports"])
        assert set(monitor["spec"]["podTargetLabels"]) >= {"kvpilot.io/role", "kvpilot.io/workerpool"}

        # A deleted monitor comes back (level-triggered, like every other child).
        old_uid = monitor["metadata"]["uid"]
        assert crds.kubectl("delete", "-n", namespace, "podmonitor", "mon").returncode == 0
        wait_for(lambda: (kget("podmonitor", "mon") or {"metadata": {"uid": old_uid}})["metadata"]["uid"] != old_uid,
                 60, f"the PodMonitor recreated\n{operator.log_tail()}")

        # Deleting the LLMService takes the monitor with it.
        assert crds.kubectl("delete", "-n", namespace, "llmservice", "mon", "--wait=true").returncode == 0
        wait_for(lambda: kget("podmonitor", "mon") is None, 90, "the PodMonitor garbage-collected")
    finally:
        crds.kubectl("delete", "-f", str(MONITORING_CRDS), "--wait=true")
    assert not _failures(operator.log()[start:], namespace), operator.log_tail()
