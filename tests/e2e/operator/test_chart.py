"""The Helm chart: lint clean, renders least-privilege RBAC and the operator, installs into the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import yaml

from kvpilot.crds import LLMServiceSpec, WorkerPoolSpec
from kvpilot.operator import render, render_pool
from kvpilot.operator.poddefaults import PodDefaults
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
    assert verbs[("", "secrets")] == {"create"}   # the routers' admin tokens: made once, never read back
    # watched like the other children (child_event), so a deleted pool budget comes back
    assert verbs[("policy", "poddisruptionbudgets")] == {"get", "list", "watch", "create", "patch"}
    assert "delete" not in verbs[("kvpilot.io", "llmservices")]
    assert verbs[("monitoring.coreos.com", "podmonitors")] == {"create", "patch"}  # server-side apply only
    assert verbs[("kopf.dev", "kopfpeerings")] == {"get", "list", "watch", "patch"}
    assert verbs[("ray.io", "rayservices")] == {"get", "list", "create", "patch", "delete"}  # ray-serve: listed
    cluster = next(d for d in docs if d["kind"] == "ClusterRole")
    assert not any("deployments" in rule["resources"] for rule in cluster["rules"])  # namespaced when scoped
    assert ("kopf.dev", "clusterkopfpeerings") not in _verbs(cluster)
    # The autoscaler: its own account, only what it uses, in the same scope.
    scaler = _verbs(_named(docs, "Role", "kv-kvpilot-autoscaler"))
    assert scaler == {("kvpilot.io", "llmservices"): {"get", "list"}, ("kvpilot.io", "llmservices/status"): {"patch"},
                      ("kvpilot.io", "workerpools"): {"get"}, ("kvpilot.io", "workerpools/scale"): {"get", "patch"},
                      ("", "pods"): {"list", "patch"},
                      ("autoscaling", "horizontalpodautoscalers"): {"list"},          # refuses HPA-targeted pools
                      ("coordination.k8s.io", "leases"): {"get", "create", "update"}}  # --leader-elect
    dep = _named(docs, "Deployment", "kv-kvpilot-autoscaler")["spec"]
    assert dep["replicas"] == 1 and dep["template"]["spec"]["serviceAccountName"] == "kv-kvpilot-autoscaler"
    assert dep["template"]["spec"]["containers"][0]["args"][:2] == ["autoscaler", "run"]
    assert "--namespace=team-a" in dep["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--prometheus-url") for a in dep["template"]["spec"]["containers"][0]["args"])
    # A Prometheus for services with spec.autoscaling.metricsSource: prometheus reaches the autoscaler.
    out = crds.helm("template", "kv", CHART, "--namespace", "kvpilot-system", "--skip-tests",
                    "--set", "autoscaler.prometheusURL=http://prometheus.monitoring:9090")
    assert out.returncode == 0, out.stderr
    dep = _named(_docs(out.stdout), "Deployment", "kv-kvpilot-autoscaler")["spec"]
    assert "--prometheus-url=http://prometheus.monitoring:9090" in dep["template"]["spec"]["containers"][0]["args"]


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


# Each bad value and the words helm's error must carry: the value's path, so the user knows which.
BAD_VALUES = [
    ("replicaCount=two", "replicaCount"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("logLevel=LOUD", "logLevel"),
    ("watchNamespaces={Team_A}", "watchNamespaces"),
    ("metrics.port=70000", "port"),
    ("workloads.modelCache.hostPath=relative/dir", "hostPath"),
    ("workloads.priorityClassName[0]=x", "priorityClassName"),
    ("autoscaler.prometheusURL=prometheus:9090", "prometheusURL"),
]


def test_bad_values_fail_lint_and_install_naming_the_value(crds: ControlPlane) -> None:
    release, ns = f"bad{uuid.uuid4().hex[:6]}", f"kvpilot-{uuid.uuid4().hex[:6]}"
    for value, named in BAD_VALUES:
        lint = crds.helm("lint", "--strict", CHART, "--set", value)
        assert lint.returncode != 0, f"{value} passed helm lint"
        assert named in lint.stdout + lint.stderr and "schema" in lint.stdout + lint.stderr, lint.stdout
        install = crds.helm("install", release, CHART, "--namespace", ns, "--create-namespace", "--set", value)
        assert install.returncode != 0, f"{value} installed"
        assert named in install.stderr, install.stderr
    assert release not in crds.helm("list", "--all-namespaces", "-q").stdout   # nothing was installed
    # Both model-cache sources at once is refused too (one directory, one source).
    both = crds.helm("lint", CHART, "--set", "workloads.modelCache.hostPath=/mnt/hf",
                     "--set", "workloads.modelCache.existingClaim=hf")
    assert both.returncode != 0 and "modelCache" in both.stdout + both.stderr, both.stdout
    good = crds.helm("lint", "--strict", CHART, "--set", "workloads.modelCache.hostPath=/mnt/hf",
                     "--set", "workloads.imagePullSecrets[0].name=regcred")
    assert good.returncode == 0, good.stdout + good.stderr


WORKLOADS = ["--set", "imagePullSecrets[0].name=regcred", "--set", "workloads.priorityClassName=llm-serving",
             "--set", "workloads.modelCache.existingClaim=hf-cache",
             "--set-json", 'workloads.extraVolumes=[{"name":"ca","configMap":{"name":"corp-ca"}}]',
             "--set-json", 'workloads.extraVolumeMounts=[{"name":"ca","mountPath":"/etc/ssl/corp"}]']


def _pod_defaults(docs: list[dict[str, Any]]) -> dict[str, Any]:
    operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kv-kvpilot")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    arg = next(a for a in container["args"] if a.startswith("--pod-defaults="))
    parsed: dict[str, Any] = json.loads(arg.removeprefix("--pod-defaults="))
    return parsed


def test_workloads_values_reach_the_operator_and_its_pods_run_read_only(crds: ControlPlane) -> None:
    out = crds.helm("template", "kv", CHART, "--namespace", "kvpilot-system", "--skip-tests", *WORKLOADS)
    assert out.returncode == 0, out.stderr
    docs = _docs(out.stdout)
    defaults = PodDefaults.parse(_pod_defaults(docs))
    # The operator's own pull secrets are the default for the pods it makes (they run the same image).
    assert defaults.image_pull_secrets == ("regcred",) and defaults.priority_class_name == "llm-serving"
    assert defaults.model_cache == {"persistentVolumeClaim": {"claimName": "hf-cache"}}
    assert defaults.volumes == ({"name": "ca", "configMap": {"name": "corp-ca"}},)
    for name in ("kv-kvpilot", "kv-kvpilot-autoscaler"):
        pod = _named(docs, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 65532
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in pod["containers"][0]["volumeMounts"]   # a writable /tmp
    bare = _pod_defaults(_docs(crds.helm("template", "kv", CHART, "--skip-tests").stdout))
    assert PodDefaults.parse(bare) == PodDefaults()


def _render_children(doc: dict[str, Any], ns: str, defaults: PodDefaults) -> list[dict[str, Any]]:
    """What the operator makes of one LLMService (and of each of its WorkerPools)."""
    spec = LLMServiceSpec.model_validate(doc["spec"])
    owner = render.Owner("kvpilot.io/v1alpha1", "LLMService", doc["metadata"]["name"], ns, str(uuid.uuid4()))
    objs = [*render.workerpools(spec, owner), *render.router_objects(spec, owner, "ghcr.io/kvpilot/kvpilot:0.1.0",
                                                                     defaults),
            render.admin_secret(owner, "token-0")]
    for pool in render.workerpools(spec, owner):
        pool_owner = render.Owner("kvpilot.io/v1alpha1", "WorkerPool", pool["metadata"]["name"], ns, str(uuid.uuid4()))
        pspec = WorkerPoolSpec.model_validate(pool["spec"])
        objs += [render_pool.pool_deployment(pspec, pool_owner, defaults),
                 render_pool.pool_disruption_budget(pspec, pool_owner), render_pool.pool_service(pspec, pool_owner)]
    return objs


def test_rendered_objects_pass_server_dry_run_for_every_example(crds: ControlPlane) -> None:
    """The chart's objects and, for every example, the example and everything the operator renders
    from it (with the chart's pod defaults) are accepted by the real apiserver's validation."""
    out = crds.kubectl("apply", "-f", str(REPO_ROOT / "helm" / "kvpilot" / "crds"))   # as helm install would
    assert out.returncode == 0, out.stderr
    ns = f"dry-{uuid.uuid4().hex[:6]}"
    assert crds.kubectl("create", "namespace", ns).returncode == 0
    try:
        out = crds.helm("template", "kv", CHART, "--namespace", ns, "--skip-tests", *WORKLOADS)
        assert out.returncode == 0, out.stderr
        chart_docs = _docs(out.stdout)
        applied = crds.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=out.stdout)
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.count("(server dry run)") == len(chart_docs)
        defaults = PodDefaults.parse(_pod_defaults(chart_docs))
        examples = sorted((REPO_ROOT / "deploy" / "examples").glob("*.yaml"))
        assert len(examples) >= 4
        for path in examples:
            doc = yaml.safe_load(path.read_text())
            children = _render_children(doc, ns, defaults)
            kinds = {c["kind"] for c in children}
            assert {"WorkerPool", "Deployment", "PodDisruptionBudget", "Service", "ConfigMap"} <= kinds
            listing = {"apiVersion": "v1", "kind": "List", "items": [doc, *children]}
            applied = crds.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(listing))
            assert applied.returncode == 0, f"{path.name}: {applied.stderr}"
            assert applied.stdout.count("(server dry run)") == len(children) + 1, applied.stdout
    finally:
        crds.kubectl("delete", "namespace", ns, "--wait=false")
