"""The Helm chart: lint clean, renders least-privilege RBAC and the operator, installs into the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import yaml

from kvpilot.testing.k8s import REPO_ROOT, ControlPlane

CHART = str(REPO_ROOT / "helm" / "kvpilot")


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_lint_and_template(crds: ControlPlane) -> None:
    for extra in ([], ["--set", "replicaCount=2", "--set", "watchNamespaces={a,b}"]):
        out = crds.helm("lint", "--strict", CHART, *extra)
        assert out.returncode == 0, out.stdout + out.stderr
    out = crds.helm("template", "kv", CHART, "--namespace", "kvpilot-system", "--skip-tests", "--set", "replicaCount=2",
                    "--set", "watchNamespaces={team-a}")
    assert out.returncode == 0, out.stderr
    docs = _docs(out.stdout)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", *["ConfigMap"] * 4, "Deployment", "Deployment",
                     "KopfPeering", "Role", "Role", "RoleBinding", "RoleBinding", "Service", "Service",
                     "ServiceAccount", "ServiceAccount"]   # ConfigMaps: dashboards; 2nd Service: autoscaler metrics
    args = _named(docs, "Deployment", "kv-kvpilot")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["operator", "run"] and "--peering=kv-kvpilot" in args and "--namespace=team-a" in args
    assert "--standalone" not in args and "--no-pod-monitors" not in args
    peering = next(d for d in docs if d["kind"] == "KopfPeering")
    assert peering["metadata"] == {**peering["metadata"], "name": "kv-kvpilot", "namespace": "team-a"}
    role = _named(docs, "Role", "kv-kvpilot")
    assert role["metadata"]["namespace"] == "team-a"
    verbs = _verbs(role)
    assert verbs[("apps", "deployments")] == {"get", "list", "watch", "create", "patch"}  # never delete or update
    assert "delete" not in verbs[("kvpilot.io", "llmservices")]
    assert verbs[("monitoring.coreos.com", "podmonitors")] == {"create", "patch"}  # server-side apply only
    assert verbs[("kopf.dev", "kopfpeerings")] == {"get", "list", "watch", "patch"}
    cluster = next(d for d in docs if d["kind"] == "ClusterRole")
    assert not any("deployments" in rule["resources"] for rule in cluster["rules"])  # namespaced when scoped
    assert ("kopf.dev", "clusterkopfpeerings") not in _verbs(cluster)
    # The autoscaler: its own account, only what it uses, in the same scope.
    scaler = _verbs(_named(docs, "Role", "kv-kvpilot-autoscaler"))
    assert scaler == {("kvpilot.io", "llmservices"): {"get", "list"}, ("kvpilot.io", "llmservices/status"): {"patch"},
                      ("kvpilot.io", "workerpools"): {"get"}, ("kvpilot.io", "workerpools/scale"): {"get", "patch"},
                      ("", "pods"): {"list", "patch"}}
    dep = _named(docs, "Deployment", "kv-kvpilot-autoscaler")["spec"]
    assert dep["replicas"] == 1 and dep["template"]["spec"]["serviceAccountName"] == "kv-kvpilot-autoscaler"
    assert dep["template"]["spec"]["containers"][0]["args"][:2] == ["autoscaler", "run"]
    assert "--namespace=team-a" in dep["template"]["spec"]["containers"][0]["args"]


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _verbs(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    return {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}


def test_template_clusterwide_peering_and_opt_outs(crds: ControlPlane) -> None:
    out = crds.helm("template", "kv", CHART, "--namespace", "kvpilot-system", "--skip-tests")
    assert out.returncode == 0, out.stderr
    docs = _docs(out.stdout)
    assert next(d for d in docs if d["kind"] == "ClusterKopfPeering")["metadata"]["name"] == "kv-kvpilot"
    cluster = _verbs(_named(docs, "ClusterRole", "kv-kvpilot-cluster"))
    assert cluster[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "patch"}
    assert cluster[("monitoring.coreos.com", "podmonitors")] == {"create", "patch"}

    out = crds.helm("template", "kv", CHART, "--namespace", "kvpilot-system", "--skip-tests",
                    "--set", "peering.enabled=false", "--set", "metrics.podMonitors=false")
    assert out.returncode == 0, out.stderr
    docs = _docs(out.stdout)
    assert not any(d["kind"].endswith("KopfPeering") for d in docs)
    args = _named(docs, "Deployment", "kv-kvpilot")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" in args and "--no-pod-monitors" in args
    groups = {g for g, _ in _verbs(_named(docs, "ClusterRole", "kv-kvpilot-cluster"))}
    assert "kopf.dev" not in groups and "monitoring.coreos.com" not in groups


def _run_helm_test_hook(plane: ControlPlane, release: str, ns: str) -> None:
    """`helm test` needs a real container (kwok only pretends to run pods), so run the hook pod's own
    command here, as the release's service account (a token for it), against the same apiserver."""
    hooks = _docs(plane.helm("get", "hooks", release, "--namespace", ns).stdout)
    pod = next(d for d in hooks if d["kind"] == "Pod" and d["metadata"]["annotations"]["helm.sh/hook"] == "test")
    container = pod["spec"]["containers"][0]
    assert pod["spec"]["serviceAccountName"] == f"{release}-kvpilot" and container["command"][0] == "python"
    token = plane.kubectl("create", "token", "-n", ns, f"{release}-kvpilot")
    assert token.returncode == 0, token.stderr
    kubeconfig = json.loads(plane.kubeconfig.read_text())
    kubeconfig["users"] = [{"name": "admin", "user": {"token": token.stdout.strip()}}]
    path = plane.dir / f"{release}.kubeconfig"
    path.write_text(json.dumps(kubeconfig))
    out = subprocess.run([sys.executable, *container["command"][1:], *container["args"]], cwd=REPO_ROOT,
                         env={**plane.env(), "KUBECONFIG": str(path)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "LLMServices" in out.stdout and "8 GPUs on the largest node" in out.stdout, out.stdout


def test_install_and_uninstall(crds: ControlPlane) -> None:
    release, ns = f"kv{uuid.uuid4().hex[:6]}", f"kvpilot-{uuid.uuid4().hex[:6]}"
    out = crds.helm("install", release, CHART, "--namespace", ns, "--create-namespace", "--wait", "--timeout", "90s")
    assert out.returncode == 0, out.stderr
    assert "kubectl apply -f" in out.stdout and f"clusterkopfpeering {release}-kvpilot" in out.stdout  # NOTES.txt
    dep = crds.kubectl("get", "deployment", "-n", ns, f"{release}-kvpilot", "-o",
                       "jsonpath={.status.availableReplicas}")
    assert dep.stdout == "1", dep.stderr
    can = crds.kubectl("auth", "can-i", "patch", "workerpools.kvpilot.io/status", "-n", "default",
                       f"--as=system:serviceaccount:{ns}:{release}-kvpilot")
    assert can.stdout.strip() == "yes"
    cannot = crds.kubectl("auth", "can-i", "delete", "deployments", "-n", "default",
                          f"--as=system:serviceaccount:{ns}:{release}-kvpilot")
    assert cannot.stdout.strip() == "no"
    can = crds.kubectl("auth", "can-i", "patch", f"clusterkopfpeerings.kopf.dev/{release}-kvpilot",
                       f"--as=system:serviceaccount:{ns}:{release}-kvpilot")
    assert can.stdout.strip() == "yes"
    scaler = f"--as=system:serviceaccount:{ns}:{release}-kvpilot-autoscaler"
    assert crds.kubectl("auth", "can-i", "patch", "workerpools.kvpilot.io", "--subresource=scale", "-n", "default",
                        scaler).stdout.strip() == "yes"
    assert crds.kubectl("auth", "can-i", "delete", "pods", "-n", "default", scaler).stdout.strip() == "no"
    auto = crds.kubectl("get", "deployment", "-n", ns, f"{release}-kvpilot-autoscaler", "-o",
                        "jsonpath={.status.availableReplicas}")
    assert auto.stdout == "1", auto.stderr
    peering = crds.kubectl("get", "clusterkopfpeering", f"{release}-kvpilot")
    assert peering.returncode == 0, peering.stderr
    _run_helm_test_hook(crds, release, ns)
    out = crds.helm("uninstall", release, "--namespace", ns, "--wait")
    assert out.returncode == 0, out.stderr
