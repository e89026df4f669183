"""KubeRay's own operator (ray-operator v1.5.0, built from its Go module by
`scripts/build-kuberay-operator.sh`) against the harness: the RayService kvpilot renders for a
`ray-serve` LLMService, the 70B example (TP 8 × PP 2), is reconciled by KubeRay into a RayCluster:
a head pod and two 8-GPU worker pods, one per pipeline stage, which the scheduler puts on the two
8-GPU kwok nodes (kwok only pretends to run them, so Serve never starts and the service stays not
Ready with KubeRay's reason); deleting the LLMService takes the RayService and the RayCluster with it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kvpilot.procs import ManagedProcess, free_port, wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane, kuberay_crds_dir, kuberay_operator_bin

Get = Any
Operator = Any  # conftest.Operator
EXAMPLE = REPO_ROOT / "deploy" / "examples" / "ray-serve-70b.yaml"
CRDS = ("rayservices", "rayclusters", "rayjobs")   # KubeRay's controllers watch all three


@pytest.fixture
def kuberay(crds: ControlPlane) -> Iterator[ManagedProcess]:
    """KubeRay's CRDs and operator, on loopback ports; both gone after the test."""
    for plural in CRDS:
        out = crds.kubectl("apply", "--server-side", "-f", str(kuberay_crds_dir() / f"ray.io_{plural}.yaml"))
        assert out.returncode == 0, out.stderr
    # (a CRD just created has no status yet, and `kubectl wait` fails rather than waits on that)
    established = ["wait", "--for=condition=Established", "--timeout=5s", *(f"crd/{p}.ray.io" for p in CRDS)]
    wait_for(lambda: crds.kubectl(*established).returncode == 0, 120, "KubeRay's CRDs")
    argv = [str(kuberay_operator_bin()), f"--metrics-addr=127.0.0.1:{free_port()}",
            f"--health-probe-bind-address=127.0.0.1:{free_port()}", "--enable-leader-election=false",
            "--log-stdout-encoder=console"]
    proc = ManagedProcess("kuberay-operator", argv, crds.dir / "logs" / "kuberay-operator.log", env=crds.env())
    try:
        yield proc
    finally:
        proc.stop()
        crds.kubectl("delete", "crd", *(f"{p}.ray.io" for p in CRDS), "--ignore-not-found", "--timeout=60s")


def _condition(obj: Any, type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def test_kuberay_reconciles_the_rayservice_into_a_raycluster(
        crds: ControlPlane, operator: Operator, kuberay: ManagedProcess, namespace: str, kget: Get) -> None:
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    out = crds.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    # The resync (20 s here) picks the service up once the operator's discovery sees KubeRay's CRD.
    wait_for(lambda: kget("rayservice", name) is not None, 60, f"the RayService\n{operator.log_tail()}")
    rayservice = kget("rayservice", name)

    def cluster() -> Any:
        items = kget("rayclusters")["items"]
        return items[0] if items else None

    wait_for(cluster, 90, "KubeRay's RayCluster", kuberay)
    rc = cluster()
    assert rc["metadata"]["ownerReferences"][0]["uid"] == rayservice["metadata"]["uid"]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]
    def scheduled() -> list[Any]:
        pods = kget("pods", "-l", f"ray.io/cluster={rc['metadata']['name']}")["items"]
        return pods if len(pods) == 3 and all(p["spec"].get("nodeName") for p in pods) else []

    wait_for(scheduled, 90, "the head and both worker pods scheduled on kwok nodes", kuberay)
    workers = [p for p in scheduled() if p["metadata"]["labels"].get("ray.io/node-type") == "worker"]
    assert len(workers) == 2 and {p["metadata"]["labels"]["ray.io/group"] for p in workers} == {"worker"}
    assert len({p["spec"]["nodeName"] for p in workers}) == 2   # a pipeline stage per 8-GPU node
    for pod in workers:
        worker = pod["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # KubeRay's own status, read back: not Ready (no Serve runs on kwok), with KubeRay's reason.
    wait_for(lambda: _condition(kget("rayservice", name), "Ready").get("reason"), 60, "KubeRay's Ready condition",
             kuberay)
    reason = _condition(kget("rayservice", name), "Ready")["reason"]
    wait_for(lambda: reason in _condition(kget("llmservice", name), "Ready").get("message", ""), 60,
             f"KubeRay's reason {reason} in the LLMService's Ready message")

    out = crds.kubectl("delete", "-n", namespace, "llmservice", name, "--wait=false")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: kget("rayservice", name) is None and cluster() is None, 90,
             "the RayService and its RayCluster garbage collected", kuberay)
