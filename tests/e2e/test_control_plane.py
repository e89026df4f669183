"""The real control plane from the harness: CRDs and watches, GPU scheduling on kwok nodes, helm."""

from __future__ import annotations

import ipaddress
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch

from kvpilot.procs import wait_for
from kvpilot.testing.k8s import ControlPlane

CHART = Path(__file__).parent / "charts" / "hello"

CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "probes.harness.kvpilot.io"},
    "spec": {
        "group": "harness.kvpilot.io",
        "scope": "Namespaced",
        "names": {"plural": "probes", "singular": "probe", "kind": "Probe"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {
                "type": "object", "required": ["size"],
                "properties": {"size": {"type": "integer", "minimum": 1}}}}}},
        }],
    },
}


def api_client(plane: ControlPlane) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(plane.kubeconfig))


def test_crd_resource_read_back_and_watched(k8s_api: ControlPlane) -> None:
    api = api_client(k8s_api)
    client.ApiextensionsV1Api(api).create_custom_resource_definition(CRD)

    def established() -> bool:
        crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(CRD["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, 30, "the CRD to be Established")
    custom = client.CustomObjectsApi(api)
    seen: list[tuple[str, int]] = []
    # Watch from the list's resourceVersion: the apiserver replays every event after it, however
    # late the watch connects (a loaded machine connected it after both writes).
    since = custom.list_namespaced_custom_object("harness.kvpilot.io", "v1", "default", "probes")
    since_rv = since["metadata"]["resourceVersion"]

    def watch_probes() -> None:
        w = watch.Watch()
        for event in w.stream(custom.list_namespaced_custom_object, "harness.kvpilot.io", "v1", "default",
                              "probes", resource_version=since_rv, timeout_seconds=20):
            seen.append((event["type"], event["object"]["spec"]["size"]))
            if event["type"] == "MODIFIED":
                w.stop()

    watcher = threading.Thread(target=watch_probes, daemon=True)
    watcher.start()
    body = {"apiVersion": "harness.kvpilot.io/v1", "kind": "Probe", "metadata": {"name": "p1"},
            "spec": {"size": 3}}
    custom.create_namespaced_custom_object("harness.kvpilot.io", "v1", "default", "probes", body)
    got = custom.get_namespaced_custom_object("harness.kvpilot.io", "v1", "default", "probes", "p1")
    assert got["spec"]["size"] == 3
    custom.patch_namespaced_custom_object("harness.kvpilot.io", "v1", "default", "probes", "p1",
                                          {"spec": {"size": 5}})
    watcher.join(25)
    assert ("ADDED", 3) in seen and ("MODIFIED", 5) in seen

    # The structural schema is enforced by the real apiserver.
    bad = {**body, "metadata": {"name": "p2"}, "spec": {"size": 0}}
    with pytest.raises(client.ApiException) as err:
        custom.create_namespaced_custom_object("harness.kvpilot.io", "v1", "default", "probes", bad)
    assert err.value.status == 422 and "spec.size" in err.value.body


def _gpu_deployment(name: str, gpus: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "engine", "image": "kvpilot/sim:test",
                                     "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}},
    }


def _pods(core: client.CoreV1Api, app: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod("default", label_selector=f"app={app}").items)


def test_gpu_pod_runs_on_kwok_node_and_oversized_stays_pending(k8s_full: ControlPlane) -> None:
    api = api_client(k8s_full)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    apps.create_namespaced_deployment("default", _gpu_deployment("gpu-one", 1))
    apps.create_namespaced_deployment("default", _gpu_deployment("gpu-too-many", 16))

    def running() -> bool:
        pods = _pods(core, "gpu-one")
        return len(pods) == 1 and pods[0].status.phase == "Running" and bool(pods[0].status.pod_ip)

    wait_for(running, 90, "the 1-GPU pod to be Running")
    pod = _pods(core, "gpu-one")[0]
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network("127.64.0.0/16")
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.annotations["kwok.x-k8s.io/node"] == "fake"
    assert node.status.allocatable["nvidia.com/gpu"] == "8"

    def unschedulable() -> bool:
        pods = _pods(core, "gpu-too-many")
        conds = pods[0].status.conditions or [] if pods else []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conds)

    wait_for(unschedulable, 60, "the 16-GPU pod to be marked Unschedulable")
    big = _pods(core, "gpu-too-many")[0]
    assert big.status.phase == "Pending" and big.spec.node_name is None
    msg = next(c.message for c in big.status.conditions if c.type == "PodScheduled")
    assert "nvidia.com/gpu" in msg


def test_helm_template_and_install(k8s_full: ControlPlane) -> None:
    rendered = k8s_full.helm("template", "demo", str(CHART), "--set", "greeting=hi")
    assert rendered.returncode == 0, rendered.stderr
    assert "name: demo-hello" in rendered.stdout and 'greeting: "hi"' in rendered.stdout

    release = f"r{uuid.uuid4().hex[:6]}"
    installed = k8s_full.helm("install", release, str(CHART), "--namespace", "default", "--wait",
                              "--timeout", "60s", "-o", "json")
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout)["info"]["status"] == "deployed"
    cm = client.CoreV1Api(api_client(k8s_full)).read_namespaced_config_map(f"{release}-hello", "default")
    assert cm.data["greeting"] == "hello"
    assert cm.data["kubeVersion"].startswith("v1.34.")  # the apiserver reports its real version

    removed = k8s_full.helm("uninstall", release, "--namespace", "default", "--wait")
    assert removed.returncode == 0, removed.stderr
    with pytest.raises(client.ApiException) as err:
        client.CoreV1Api(api_client(k8s_full)).read_namespaced_config_map(f"{release}-hello", "default")
    assert err.value.status == 404


def test_control_plane_teardown_leaves_no_process(tmp_path: Path) -> None:
    plane = ControlPlane("api", workdir=tmp_path / "plane").start()
    pids = [p.pid for p in plane.procs]
    assert plane.ready()
    plane.cleanup()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not plane.dir.exists()
