"""Cache-preserving scale-in on Kubernetes: when a pod leaves the ready set (deleted by a
scale-in, still running through its grace period), the router's discovery sees it go and hands
its hot prefix to the pod that inherits the key, with no call from anyone else."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from typing import Any

from kvpilot.procs import free_port, wait_for
from kvpilot.router.hashring import dual_ring_owners
from kvpilot.testing.k8s import ControlPlane
from kvpilot.testing.pods import HandPods
from kvpilot.testing.redis import RedisServer
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_hashes, block_text


def _complete(router: RouterProcess, prompt: str) -> tuple[str, int]:
    req = urllib.request.Request(router.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "sim-model", "prompt": prompt, "max_tokens": 2}).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        out = json.loads(resp.read())
        return str(resp.headers["X-Kvpilot-Endpoint"]), int(out["usage"]["prompt_tokens_details"]["cached_tokens"])


def _handovers(router: RouterProcess, outcome: str) -> float:
    m = re.search(rf'kvpilot_router_handovers_total{{[^}}]*kind="scale_in",[^}}]*outcome="{outcome}"}} (\S+)',
                  router.metrics_text())
    return float(m.group(1)) if m else 0.0


def test_a_deleted_pods_hot_prefix_moves_to_its_ring_successor(
        k8s_api: ControlPlane, redis_server: RedisServer, sim_worker_factory: Callable[..., SimWorker],
        tmp_path: Any, monkeypatch: Any) -> None:
    pods = HandPods(k8s_api, "hand")
    port = free_port("127.64.10.1")
    names = [f"engine-{i}" for i in (1, 2, 3)]
    for i, name in enumerate(names, start=1):
        sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--kv-store", redis_server.url,
                           host=f"127.64.10.{i}", port=port)
        pods.add(name, {"app": "hand"}, f"127.64.10.{i}")
    members, owners = frozenset(names), dual_ring_owners()
    prompt = next(p for p in (block_text(s, 1024) for s in range(500))
                  if owners(block_hashes(p, 256)[0], members)[0] == "engine-3")
    key = block_hashes(prompt, 256)[0]

    monkeypatch.setenv("KUBECONFIG", str(k8s_api.kubeconfig))
    router = RouterProcess([{"name": "sim-model", "policy": "dualmap", "discovery": {
        "namespace": pods.ns, "port": port, "pools": {"both": "app=hand"}}}], workdir=tmp_path)
    try:
        wait_for(lambda: urllib.request.urlopen(router.url + "/ready", timeout=1).status == 200, 20,
                 "the router to discover endpoints", router.proc)
        three = 'kvpilot_router_healthy_endpoints{model="sim-model",role="main"} 3.0'
        wait_for(lambda: three in router.metrics_text(), 20, "all three pods in the pool")
        served = [_complete(router, prompt) for _ in range(3)]
        assert served[0] == ("engine-3", 0) and served[-1] == ("engine-3", 1008)

        pods.delete("engine-3")  # the worker itself keeps running, as in its grace period
        wait_for(lambda: _handovers(router, "ok") == 1, 30, "the router to hand engine-3's prefix over")
        heirs = set(owners(key, members - {"engine-3"})) - set(owners(key, members))
        pod, cached = _complete(router, prompt)
        assert pod in heirs and cached == 1008
    finally:
        router.stop()
        pods.close()
