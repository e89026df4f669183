"""The chart ships kvpilot's dashboards (ConfigMaps for the Grafana sidecar), its PrometheusRule and
the autoscaler's Service + ServiceMonitor; the last two only where the Prometheus Operator's CRDs are
served, and each can be switched off."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import yaml

from kvpilot.dashboards.queries import DASHBOARDS, RULES
from kvpilot.procs import wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane

CHART = str(REPO_ROOT / "helm" / "kvpilot")
MONITORING_CRDS = Path(__file__).parent / "prometheus-operator-crds.yaml"
WITH_CRDS = ("--api-versions", "monitoring.coreos.com/v1/PrometheusRule",
             "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")


def _template(plane: ControlPlane, *args: str) -> list[dict[str, Any]]:
    out = plane.helm("template", "kv", CHART, "--namespace", "obs", "--skip-tests", *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_dashboards_rules_and_autoscaler_monitoring(crds: ControlPlane) -> None:
    out = crds.helm("lint", "--strict", CHART)
    assert out.returncode == 0, out.stdout + out.stderr
    # Without the CRDs: the dashboards and the autoscaler's Service, nothing of the Prometheus Operator's.
    docs = _template(crds)
    assert not _kinds(docs, "PrometheusRule") and not _kinds(docs, "ServiceMonitor")
    maps = {d["metadata"]["name"]: d for d in _kinds(docs, "ConfigMap")}
    assert set(maps) == {f"kv-kvpilot-dashboard-{p.stem}" for p in DASHBOARDS.glob("*.json")}
    for cm in maps.values():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "kvpilot"}
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((DASHBOARDS / key).read_text())
    svc = next(d for d in _kinds(docs, "Service") if d["metadata"]["name"] == "kv-kvpilot-autoscaler-metrics")
    scaler = next(d for d in _kinds(docs, "Deployment") if d["metadata"]["name"] == "kv-kvpilot-autoscaler")
    assert svc["spec"]["selector"].items() <= scaler["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9091, "targetPort": "metrics"}]

    # With them: the rules as deploy/prometheus/rules.yaml has them, and a ServiceMonitor keeping the
    # autoscaler's own namespace/service labels.
    docs = _template(crds, *WITH_CRDS, "--set", "monitoring.prometheusRule.labels.release=kps")
    (rule,) = _kinds(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text()) and rule["metadata"]["labels"]["release"] == "kps"
    (mon,) = _kinds(docs, "ServiceMonitor")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] == "metrics" and mon["spec"]["endpoints"][0]["honorLabels"] is True

    # Each can be switched off.
    docs = _template(crds, *WITH_CRDS, "--set", "monitoring.dashboards.enabled=false",
                     "--set", "monitoring.prometheusRule.enabled=false", "--set", "monitoring.autoscaler.service=false")
    assert not [d for d in docs if d["kind"] in ("ConfigMap", "PrometheusRule", "ServiceMonitor")]
    assert all(d["metadata"]["name"] != "kv-kvpilot-autoscaler-metrics" for d in docs)


def test_install_creates_rules_where_the_crds_exist(crds: ControlPlane) -> None:
    release, ns = f"kv{uuid.uuid4().hex[:6]}", f"obs-{uuid.uuid4().hex[:6]}"
    try:
        out = crds.kubectl("apply", "-f", str(MONITORING_CRDS))
        assert out.returncode == 0, out.stderr
        crds.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                     "crd/prometheusrules.monitoring.coreos.com", "crd/servicemonitors.monitoring.coreos.com")
        # Discovery can lag a new CRD by a moment; helm reads the served APIs from it.
        wait_for(lambda: "prometheusrules" in crds.kubectl("api-resources", "--api-group=monitoring.coreos.com").stdout,
                 30, "the PrometheusRule API to be served")
        out = crds.helm("install", release, CHART, "--namespace", ns, "--create-namespace")
        assert out.returncode == 0, out.stderr
        for kind, name in (("prometheusrule", f"{release}-kvpilot"),
                           ("servicemonitor", f"{release}-kvpilot-autoscaler-metrics"),
                           ("configmap", f"{release}-kvpilot-dashboard-autoscaling")):
            got = crds.kubectl("get", kind, "-n", ns, name)
            assert got.returncode == 0, got.stderr
        assert crds.helm("uninstall", release, "--namespace", ns, "--wait").returncode == 0
    finally:
        crds.kubectl("delete", "-f", str(MONITORING_CRDS), "--wait=true")
