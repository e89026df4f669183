"""`engine.type: ray-serve` on the real apiserver with KubeRay's own CRDs (ray-operator v1.5.0, from the
Go module: `scripts/kuberay-crds.sh`): without them the service is Degraded and nothing is applied;
with them it becomes a RayService the CRD schema accepts field for field, its readiness becomes the
LLMService's, and deleting the LLMService removes it; removing the CRD again leaves the operator
serving. No KubeRay operator runs here: the test writes the RayService's status subresource as
KubeRay would."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from kvpilot.crds import LLMService
from kvpilot.operator import render_ray
from kvpilot.procs import wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane, kuberay_crds_dir

Get = Callable[..., Any]
Operator = Any  # conftest.Operator
EXAMPLE = REPO_ROOT / "deploy" / "examples" / "ray-serve-simulator.yaml"
RAYSERVICE_CRD = "rayservices.ray.io"


@pytest.fixture
def kuberay_crds(crds: ControlPlane) -> Iterator[Callable[[], None]]:
    """Call to install KubeRay's RayService CRD; it is removed again after the test, so the other
    tests see a cluster without KubeRay."""
    def install() -> None:
        # server-side: the CRD (1 MB) is too big for client-side apply's last-applied annotation
        out = crds.kubectl("apply", "--server-side", "-f", str(kuberay_crds_dir() / "ray.io_rayservices.yaml"))
        assert out.returncode == 0, out.stderr
        # (a CRD just created has no status yet, and `kubectl wait` fails rather than waits on that)
        wait_for(lambda: crds.kubectl("wait", "--for=condition=Established", "--timeout=5s",
                                      f"crd/{RAYSERVICE_CRD}").returncode == 0, 120, "the RayService CRD")

    yield install
    crds.kubectl("delete", "crd", RAYSERVICE_CRD, "--ignore-not-found", "--timeout=60s")


def _condition(obj: Any, type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def _contains(stored: Any, rendered: Any, path: str = "spec") -> list[str]:
    """Where the stored object lacks or changed what was rendered (the apiserver may only add defaults)."""
    if isinstance(rendered, dict):
        if not isinstance(stored, dict):
            return [path]
        return [p for k, v in rendered.items() for p in _contains(stored.get(k), v, f"{path}.{k}")]
    if isinstance(rendered, list):
        if not isinstance(stored, list) or len(stored) != len(rendered):
            return [path]
        pairs = enumerate(zip(stored, rendered, strict=True))
        return [p for i, (s, r) in pairs for p in _contains(s, r, f"{path}[{i}]")]
    return [] if stored == rendered else [path]


def test_ray_serve_service_becomes_a_rayservice_that_reports_back_and_goes_with_it(
        crds: ControlPlane, operator: Operator, namespace: str, kget: Get,
        kuberay_crds: Callable[[], None]) -> None:
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    if crds.kubectl("get", "crd", RAYSERVICE_CRD).returncode != 0:
        # No KubeRay: nothing half-applied, and a reason to act on.
        out = crds.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
        assert out.returncode == 0, out.stderr
        wait_for(lambda: _condition(kget("llmservice", name), "Degraded").get("reason") == "KubeRayNotInstalled",
                 30, f"Degraded KubeRayNotInstalled\n{operator.log_tail()}")
        assert kget("workerpools")["items"] == [] and kget("deployment", f"{name}-router") is None
    kuberay_crds()
    out = crds.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    assert out.returncode == 0, out.stderr

    poked = [0.0]

    def rayservice() -> Any:
        # The operator's discovery cache forgets in 10 s; a changed annotation makes kopf reconcile now.
        if time.monotonic() - poked[0] > 3:
            poked[0] = time.monotonic()
            crds.kubectl("annotate", "--overwrite", "-n", namespace, "llmservice", name, f"test/poke={poked[0]}")
        return kget("rayservice", name)

    wait_for(rayservice, 60, f"the RayService\n{operator.log_tail()}")
    svc, stored = kget("llmservice", name), kget("rayservice", name)
    assert stored["metadata"]["ownerReferences"] == [{"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService",
                                                      "name": name, "uid": svc["metadata"]["uid"],
                                                      "controller": True, "blockOwnerDeletion": True}]
    # The CRD's schema kept every field the operator rendered (the apiserver prunes unknown ones) ...
    rendered = render_ray.rayservice(LLMService.model_validate(svc).spec, svc)
    assert _contains(stored["spec"], rendered["spec"]) == []
    # ... and rejects none of them when asked to be strict.
    rendered["metadata"]["name"] = f"{name}-strict"
    out = crds.kubectl("create", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-",
                       input=json.dumps(rendered))
    assert out.returncode == 0, out.stderr
    serve = yaml.safe_load(stored["spec"]["serveConfigV2"])
    assert serve["applications"][0]["deployments"][0]["request_router_config"]["request_router_class"] == \
        "kvpilot.ray.router.KvpilotRouter"
    assert kget("workerpools")["items"] == []   # no pools and no kvpilot router: Serve routes
    wait_for(lambda: _condition(kget("llmservice", name), "Ready").get("reason") == "RayServiceNotReady", 30,
             "Ready False until KubeRay says so")
    status = kget("llmservice", name)["status"]
    assert status["phase"] == "Progressing" and status["endpoint"] == f"http://{name}-serve-svc.{namespace}.svc:8000"

    # KubeRay's part, written by hand: the Serve app runs and the Ready condition turns True.
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ready = {"status": {"serviceStatus": "Running", "numServeEndpoints": 1,
                        "observedGeneration": stored["metadata"]["generation"],
                        "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints",
                                        "message": "", "lastTransitionTime": now}],
                        "activeServiceStatus": {"applicationStatuses": {"llm": {"status": "RUNNING"}}}}}
    out = crds.kubectl("patch", "-n", namespace, "rayservice", name, "--subresource=status", "--type=merge",
                       "-p", json.dumps(ready))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: _condition(kget("llmservice", name), "Ready").get("status") == "True", 30,
             f"LLMService Ready from the RayService\n{operator.log_tail()}")
    svc = kget("llmservice", name)
    assert svc["status"]["phase"] == "Ready" and _condition(svc, "Ready")["reason"] == "RayServiceReady"

    out = crds.kubectl("delete", "-n", namespace, "llmservice", name, "--wait=false")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: kget("rayservice", name) is None, 60, "garbage collection of the RayService")

    # Uninstalling KubeRay (its CRD deleted) leaves the operator running and reconciling: RayServices
    # are listed, not watched (a kopf watch on a deleted CRD could take the whole operator down).
    out = crds.kubectl("delete", "crd", RAYSERVICE_CRD, "--timeout=60s")
    assert out.returncode == 0, out.stderr
    out = crds.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: _condition(kget("llmservice", name), "Degraded").get("reason") == "KubeRayNotInstalled",
             60, f"Degraded KubeRayNotInstalled after the CRD went\n{operator.log_tail()}", operator.proc)
    assert operator.proc.alive(), operator.log_tail()
