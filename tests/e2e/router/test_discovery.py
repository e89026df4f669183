"""The router finds its endpoints as ready pods on a real apiserver, following pod churn."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

from kvpilot.procs import free_port, wait_for
from kvpilot.testing.k8s import ControlPlane
from kvpilot.testing.pods import HandPods
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text


def _served_by(router: RouterProcess, prompt: str) -> str:
    req = urllib.request.Request(router.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "sim-model", "prompt": prompt, "max_tokens": 2}).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return str(resp.headers["X-Kvpilot-Endpoint"])


def test_router_follows_ready_pods(k8s_api: ControlPlane, sim_worker_factory: Callable[..., SimWorker],
                                   tmp_path: Any, monkeypatch: Any) -> None:
    pods = HandPods(k8s_api, "disc")
    # Two "pods": simulator workers on distinct loopback IPs and one shared port, like pod IPs.
    port = free_port("127.64.9.1")
    workers = {f"engine-{i}": sim_worker_factory("--profile", "h100-qwen2.5-0.5b", host=f"127.64.9.{i}", port=port)
               for i in (1, 2)}
    labels = {"kvpilot.io/service": "demo", "app.kubernetes.io/component": "engine"}
    for i, name in enumerate(workers, start=1):
        pods.add(name, labels, f"127.64.9.{i}")
    pods.add("unrelated", {"app": "other"}, "127.64.9.3")

    monkeypatch.setenv("KUBECONFIG", str(k8s_api.kubeconfig))
    router = RouterProcess([{"name": "sim-model", "policy": "round-robin", "discovery": {
        "namespace": pods.ns, "port": port,
        "pools": {"both": "kvpilot.io/service=demo,app.kubernetes.io/component=engine"}}}], workdir=tmp_path)
    try:
        wait_for(lambda: urllib.request.urlopen(router.url + "/ready", timeout=1).status == 200, 20,
                 "the router to discover endpoints", router.proc)
        seen = {_served_by(router, block_text(i, 32)) for i in range(6)}
        assert seen == {"engine-1", "engine-2"}

        pods.set_ready("engine-2", "127.64.9.2", ready=False)  # failing readiness: out of rotation
        wait_for(lambda: {_served_by(router, block_text(100 + i, 32)) for i in range(4)} == {"engine-1"}, 20,
                 "the not-ready pod to leave the pool")

        pods.set_ready("engine-2", "127.64.9.2", ready=True)
        pods.delete("engine-1", grace_period_seconds=0)
        wait_for(lambda: {_served_by(router, block_text(200 + i, 32)) for i in range(4)} == {"engine-2"}, 20,
                 "the deleted pod to leave and the recovered one to return")
    finally:
        router.stop()
        pods.close()
