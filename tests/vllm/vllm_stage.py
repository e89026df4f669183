"""Stages of real vLLM instances for the `vllm` tier (fixtures in conftest.py), and request helpers.

vLLM instances take 40-50 s to start on one core, so the tier shares them: `Stages.get(kind)` keeps
one stage of at most two instances alive, pinned to cores 0 and 1, and swaps stages only when a test
asks for another kind (test files are ordered so that each stage starts once):
- "pair": two replicas of an aggregated pool with prefix caching, a 16-block KV cache (2,048 tokens:
  eviction and queueing are reachable) and KV events;
- "pd": one prefill and one decode replica with NixlConnector over host memory.
Every instance runs exactly the args and env the operator renders for its pool (`pod_from_operator`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpilot.crds import LLMServiceSpec, WorkerPoolSpec
from kvpilot.operator import render, render_pool
from kvpilot.procs import free_ports
from kvpilot.testing.vllm import BASE_ARGS, SERVED, VLLMServer, pod_from_operator, tiny_model

OWNER = render.Owner("kvpilot.io/v1alpha1", "LLMService", "tiny", "default", "uid-tiny")
# Engine args the LLMService carries (spec.engine.args): the tiny model's limits and a small cache.
ENGINE_ARGS = [a for a in BASE_ARGS if a != "--enable-prefix-caching"] + [
    "--num-gpu-blocks-override", "16", "--enable-prompt-tokens-details"]


def service_spec(mode: str) -> LLMServiceSpec:
    pool = {"replicas": 2 if mode == "aggregated" else 1, "gpus": 0}
    body: dict[str, Any] = {"model": {"name": str(tiny_model()), "servedName": SERVED},
                            "engine": {"type": "vllm", "args": ENGINE_ARGS}, "mode": mode, "decode": pool}
    if mode == "disaggregated":
        body["prefill"] = pool
    return LLMServiceSpec.model_validate(body)


def rendered_deployment(spec: LLMServiceSpec, role: str) -> dict[str, Any]:
    obj = next(p for p in render.workerpools(spec, OWNER) if p["spec"]["role"] == role)
    owner = render.Owner("kvpilot.io/v1alpha1", "WorkerPool", obj["metadata"]["name"], "default", "uid-pool")
    return render_pool.pool_deployment(WorkerPoolSpec.model_validate(obj["spec"]), owner)


@dataclass
class Stage:
    kind: str
    servers: dict[str, VLLMServer]
    kv_port: int                        # the router binds here; the instances dial in
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)   # pod → rendered Deployment
    kv_replay: dict[str, str] = field(default_factory=dict)                # pod → its KV-event replay socket

    def kv_events(self) -> dict[str, Any]:
        return {"bind": f"tcp://127.0.0.1:{self.kv_port}", "tokenizer": str(tiny_model()), "blockSize": 128}


class Stages:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.current: Stage | None = None

    def get(self, kind: str) -> Stage:
        cur = self.current
        if cur is not None and cur.kind == kind and all(s.proc.alive() for s in cur.servers.values()):
            return cur
        self.stop()
        self.current = self._start(kind)
        return self.current

    def _start(self, kind: str) -> Stage:
        # Every port at once: the servers start without waiting, so a port handed to one is not yet
        # bound when the next is picked (a NIXL side channel once collided with a replay socket).
        ports = iter(free_ports(1 + 3 * 2))
        kv_port = next(ports)
        mode = "aggregated" if kind == "pair" else "disaggregated"
        spec = service_spec(mode)
        pods = {"pair": [("tiny-worker-a", "aggregated"), ("tiny-worker-b", "aggregated")],
                "pd": [("tiny-prefill-a", "prefill"), ("tiny-decode-a", "decode")]}[kind]
        servers: dict[str, VLLMServer] = {}
        deployments: dict[str, dict[str, Any]] = {}
        replay: dict[str, str] = {}
        try:
            for cpu, (pod, role) in enumerate(pods):
                dep = rendered_deployment(spec, role)
                port, replay_port, nixl_port = next(ports), next(ports), next(ports)
                replay[pod] = f"tcp://127.0.0.1:{replay_port}"
                args, env = pod_from_operator(dep, pod=pod, port=port, kv_events=f"tcp://127.0.0.1:{kv_port}",
                                              kv_replay=replay[pod], nixl_port=nixl_port if kind == "pd" else None)
                deployments[pod] = dep
                servers[pod] = VLLMServer(args, name=pod, port=port, workdir=self.workdir, cpu=cpu, env=env,
                                          wait=False)
            for server in servers.values():
                server.wait()
        except BaseException:
            for server in servers.values():
                server.stop()
            raise
        return Stage(kind, servers, kv_port, deployments, replay)

    def stop(self) -> None:
        if self.current is not None:
            for server in self.current.servers.values():
                server.stop()
            self.current = None


def router_model(stage: Stage, policy: str = "dualmap", **extra: Any) -> dict[str, Any]:
    """The router's model entry for a stage: its instances by pod name (the KV-event topic)."""
    roles = {"tiny-worker-a": "both", "tiny-worker-b": "both", "tiny-prefill-a": "prefill", "tiny-decode-a": "decode"}
    return {"name": SERVED, "policy": policy, "mode": "aggregated" if stage.kind == "pair" else "disaggregated",
            "endpoints": [{"name": n, "url": s.url, "role": roles[n], "kvReplay": stage.kv_replay[n]}
                          for n, s in stage.servers.items()],
            "kvEvents": stage.kv_events(), **extra}


def post_json(url: str, body: dict[str, Any], timeout: float = 120) -> tuple[dict[str, Any], dict[str, str]]:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read()), dict(resp.headers)


_WORDS = ("return", "value", "import", "class", "self", "def", "None", "list", "dict", "error", "string", "path",
          "module", "object", "result", "print", "index", "token", "cache", "block", "while", "lambda", "yield")


def make_prompt(tag: str, tokens: int) -> str:
    """Deterministic text of about `tokens` tokens of the tiny model's tokenizer (within one word)."""
    import random

    from kvpilot.router.kv_events import load_tokenizer

    tok = load_tokenizer(str(tiny_model()))
    rng = random.Random(tag)
    words = [tag]
    while len(tok.encode(" ".join(words)).ids) < tokens:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


def kv_match(admin_url: str, prompt: str = "", messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The router's view of what each instance holds of a prompt, or of a chat's `messages`."""
    body: dict[str, Any] = {"model": SERVED, "prompt": prompt}
    if messages is not None:
        body = {"model": SERVED, "messages": messages}
    return post_json(admin_url + "/debug/kv-match", body)[0]
