"""Local mode: the control plane on one machine with simulated GPUs (`kvpilot up`).

Reads the same `LLMService` spec the operator reads, starts each pool's `kvpilot sim serve`
workers and a `kvpilot router` in front of them as real processes on loopback, and stops all of
them on exit (Ctrl-C, SIGTERM, or leaving the `with` block): no orphan process, no port left.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kvpilot.crds import LLMService
from kvpilot.procs import ManagedProcess, free_port, wait_for

DEFAULT_SPEC = """
apiVersion: kvpilot.io/v1alpha1
kind: LLMService
metadata: {name: local}
spec:
  model: {name: meta-llama/Llama-3.1-8B-Instruct, servedName: llama-8b}
  engine: {type: simulator, profile: h100-llama3-8b}
  mode: aggregated
  decode: {replicas: 4}
  routing: {policy: dualmap}
  slo: {ttftMs: 5000, tpotMs: 100, attainment: 0.9}
"""
ROLES = {"aggregated": "both", "prefill": "prefill", "decode": "decode"}


def load_service(path: Path | None) -> LLMService:
    text = path.read_text() if path else DEFAULT_SPEC
    return LLMService.model_validate(yaml.safe_load(text))


def _kvpilot(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "kvpilot.cli", *args]


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=1) as resp:
        return bool(resp.status == 200)


class LocalControlPlane:
    """Workers and a router for one LLMService, as processes; use as a context manager."""

    def __init__(self, service: LLMService, *, time_scale: float = 1.0, policy: str | None = None,
                 port: int | None = None, workdir: Path | None = None) -> None:
        self.service = service
        self.time_scale = time_scale
        self.policy = policy or service.spec.routing.policy
        self.port = port or free_port()
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="kvpilot-local-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[ManagedProcess] = []
        self.workers: dict[str, str] = {}  # name → URL

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return self.service.spec.model.served()

    def start(self) -> LocalControlPlane:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        spec = self.service.spec
        profile = spec.engine.profile or "h100-llama3-8b"
        endpoints: list[dict[str, Any]] = []
        for role, pool in spec.pools().items():
            for i in range(pool.replicas):
                name = f"{self.service.metadata.get('name', 'local')}-{role}-{i}"
                port = free_port()
                proc = ManagedProcess(name, _kvpilot("sim", "serve", "--profile", profile, "--model", self.model,
                                                     "--port", str(port), "--time-scale", str(self.time_scale)),
                                      self.dir / f"{name}.log")
                self.procs.append(proc)
                self.workers[name] = f"http://127.0.0.1:{port}"
                endpoints.append({"name": name, "url": self.workers[name], "role": ROLES[role]})
        for proc in self.procs:
            url = self.workers[proc.name]
            wait_for(functools.partial(_healthy, url), 30, f"worker {proc.name}", proc)
        config = {"host": "127.0.0.1", "port": self.port, "models": [{
            "name": self.model, "policy": self.policy, "mode": spec.mode, "endpoints": endpoints,
            # The router measures wall time; workers run time_scale× faster than the modelled GPUs.
            "ttftMs": spec.slo.ttft_ms / self.time_scale}]}
        cfg_path = self.dir / "router.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        router = ManagedProcess("router", _kvpilot("router", "--config", str(cfg_path)), self.dir / "router.log")
        self.procs.append(router)
        wait_for(lambda: _healthy(self.url), 30, "the router", router)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def __enter__(self) -> LocalControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
