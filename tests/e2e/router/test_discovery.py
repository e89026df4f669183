"""The router finds its endpoints as ready pods on a real apiserver, following pod churn."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client, config

from kvpilot.procs import free_port, wait_for
from kvpilot.testing.k8s import ControlPlane
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text


def _pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "engine", "image": "kvpilot/sim:test"}]}}


def _set_ready(core: client.CoreV1Api, ns: str, name: str, ip: str, ready: bool) -> None:
    """Play the kubelet's part: api-only mode has none, so the test writes pod status itself."""
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    core.patch_namespaced_pod_status(name, ns, {"status": status})


def _served_by(router: RouterProcess, prompt: str) -> str:
    req = urllib.request.Request(router.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "sim-model", "prompt": prompt, "max_tokens": 2}).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return str(resp.headers["X-Kvpilot-Endpoint"])


def test_router_follows_ready_pods(k8s_api: ControlPlane, sim_worker_factory: Callable[..., SimWorker],
                                   tmp_path: Any, monkeypatch: Any) -> None:
    ns = f"disc-{uuid.uuid4().hex[:6]}"
    api = config.new_client_from_config(config_file=str(k8s_api.kubeconfig))
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": ns}})
    # Two "pods": simulator workers on distinct loopback IPs and one shared port, like pod IPs.
    port = free_port("127.64.9.1")
    workers = {f"engine-{i}": sim_worker_factory("--profile", "h100-qwen2.5-0.5b", host=f"127.64.9.{i}", port=port)
               for i in (1, 2)}
    labels = {"kvpilot.io/service": "demo", "app.kubernetes.io/component": "engine"}
    for i, name in enumerate(workers, start=1):
        core.create_namespaced_pod(ns, _pod(name, labels))
        _set_ready(core, ns, name, f"127.64.9.{i}", ready=True)
    core.create_namespaced_pod(ns, _pod("unrelated", {"app": "other"}))
    _set_ready(core, ns, "unrelated", "127.64.9.3", ready=True)

    monkeypatch.setenv("KUBECONFIG", str(k8s_api.kubeconfig))
    router = RouterProcess([{"name": "sim-model", "policy": "round-robin", "discovery": {
        "namespace": ns, "port": port,
        "pools": {"both": "kvpilot.io/service=demo,app.kubernetes.io/component=engine"}}}], workdir=tmp_path)
    try:
        wait_for(lambda: urllib.request.urlopen(router.url + "/ready", timeout=1).status == 200, 20,
                 "the router to discover endpoints", router.proc)
        seen = {_served_by(router, block_text(i, 32)) for i in range(6)}
        assert seen == {"engine-1", "engine-2"}

        _set_ready(core, ns, "engine-2", "127.64.9.2", ready=False)  # failing readiness: out of rotation
        wait_for(lambda: {_served_by(router, block_text(100 + i, 32)) for i in range(4)} == {"engine-1"}, 20,
                 "the not-ready pod to leave the pool")

        _set_ready(core, ns, "engine-2", "127.64.9.2", ready=True)
        core.delete_namespaced_pod("engine-1", ns, grace_period_seconds=0)
        wait_for(lambda: {_served_by(router, block_text(200 + i, 32)) for i in range(4)} == {"engine-2"}, 20,
                 "the deleted pod to leave and the recovered one to return")
    finally:
        router.stop()
        core.delete_namespace(ns)
