"""A test-only "process kubelet": kwok pods that run `kvpilot sim serve` become real processes.

kwok gives pods a phase and a 127.64.x IP but runs nothing. For end-to-end tests of the
autoscaler and router on the real API, this watches the pods of one label selector and starts
each pod's own container command (the args the operator rendered) as a local process bound to
the pod's IP, and stops it when the pod goes away. So the worker that answers at a pod's IP is
the one the operator asked for, and scaling a WorkerPool really adds or removes servers.
Router pods run too (`kvpilot router --config …`): their ConfigMap's config, bound to the pod's
IP, with the control plane's kubeconfig for discovery; so the autoscaler finds a live router at
the router pod's IP, as in a cluster. Only simulator engines are supported: anything else would
need the real engine.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from kvpilot.procs import ManagedProcess
from kvpilot.testing.k8s import ControlPlane


def worker_argv(container: dict[str, Any], pod_ip: str) -> list[str]:
    """The container's `kvpilot sim serve …` as a local command listening on the pod's IP."""
    words = [*container.get("command", []), *container.get("args", [])]
    if words[:1] == ["kvpilot"]:
        words = words[1:]
    if words[:2] != ["sim", "serve"]:
        raise ValueError(f"not a simulator container: {words}")
    if "--host" in words:
        words[words.index("--host") + 1] = pod_ip
    else:
        words += ["--host", pod_ip]
    return [sys.executable, "-P", "-m", "kvpilot.cli", *words]


def router_config(config_text: str, pod_ip: str, admin_token_file: Path | None = None) -> str:
    """The router's rendered config, listening (client and admin ports) on the pod's IP instead of
    every address, with the admin token where this kubelet "mounted" the pod's Secret."""
    doc = yaml.safe_load(config_text)
    doc["host"] = pod_ip
    if "adminHost" in doc:
        doc["adminHost"] = pod_ip
    if admin_token_file is not None:
        doc["adminTokenFile"] = str(admin_token_file)
    return str(yaml.safe_dump(doc, sort_keys=False))


def is_router(container: dict[str, Any]) -> bool:
    words = [*container.get("command", []), *container.get("args", [])]
    return words[:2] == ["kvpilot", "router"]


class ProcessKubelet:
    """Runs the pods of `selector` in `namespace` as local processes until `stop()`."""

    def __init__(self, plane: ControlPlane, namespace: str, selector: str, workdir: Path,
                 extra_args: list[str] | None = None, poll_s: float = 0.5) -> None:
        self.plane = plane
        self.namespace = namespace
        self.selector = selector
        self.dir = workdir
        self.extra = extra_args or []
        self.poll_s = poll_s
        self.procs: dict[str, ManagedProcess] = {}   # pod uid → its process
        self.urls: dict[str, str] = {}                # pod uid → the worker's base URL
        self.routers: dict[str, str] = {}             # pod uid → the router's base URL
        self.started: list[str] = []                  # pod names, in start order
        self.errors: list[str] = []                   # syncs that failed (the next one retries)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="process-kubelet", daemon=True)

    def start(self) -> ProcessKubelet:
        self._thread.start()
        return self

    def _pods(self) -> list[dict[str, Any]]:
        out = self.plane.kubectl("get", "pods", "-n", self.namespace, "-l", self.selector, "-o", "json")
        if out.returncode != 0:
            return []
        items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
        return items

    def _sync(self) -> None:
        live: set[str] = set()
        for pod in self._pods():
            meta, status = pod["metadata"], pod.get("status", {})
            uid, ip = meta["uid"], status.get("podIP")
            if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not ip:
                continue
            live.add(uid)
            if uid not in self.procs:
                container = pod["spec"]["containers"][0]
                if is_router(container):
                    proc = self._router(pod, ip)
                    if proc is not None:
                        self.procs[uid] = proc
                        self.started.append(meta["name"])
                    continue
                argv = worker_argv(container, ip) + self.extra
                self.procs[uid] = ManagedProcess(meta["name"], argv, self.dir / f"{meta['name']}.log")
                port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
                self.urls[uid] = f"http://{ip}:{port}"
                self.started.append(meta["name"])
        for uid in set(self.procs) - live:
            self.procs.pop(uid).stop()
            self.urls.pop(uid, None)
            self.routers.pop(uid, None)

    def _router(self, pod: dict[str, Any], ip: str) -> ManagedProcess | None:
        """The router pod as a process, with its ConfigMap's config; None until the map exists."""
        name = next((v["configMap"]["name"] for v in pod["spec"].get("volumes", []) if "configMap" in v), None)
        out = self.plane.kubectl("get", "configmap", "-n", self.namespace, str(name), "-o", "json")
        if name is None or out.returncode != 0:
            return None
        text = next(iter(json.loads(out.stdout).get("data", {}).values()), None)
        if text is None:
            return None
        token_file = None
        secret = next((v["secret"]["secretName"] for v in pod["spec"].get("volumes", []) if "secret" in v), None)
        if secret is not None:   # the admin token's Secret, "mounted" as a file; none yet: not started yet
            got = self.plane.kubectl("get", "secret", "-n", self.namespace, secret, "-o", "json")
            if got.returncode != 0:
                return None
            token_file = self.dir / f"{pod['metadata']['name']}.admin-token"
            token_file.write_bytes(base64.b64decode(json.loads(got.stdout).get("data", {}).get("token", "")))
        path = self.dir / f"{pod['metadata']['name']}.yaml"
        path.write_text(router_config(text, ip, token_file))
        argv = [sys.executable, "-P", "-m", "kvpilot.cli", "router", "--config", str(path)]
        self.routers[pod["metadata"]["uid"]] = f"http://{ip}:{yaml.safe_load(text).get('port', 8000)}"
        return ManagedProcess(pod["metadata"]["name"], argv, self.dir / f"{pod['metadata']['name']}.log",
                              env=self.plane.env())

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as e:   # a kubectl hiccup must not end the kubelet: the pods it misses now never start
                self.errors.append(f"{type(e).__name__}: {e}")
            self._stop.wait(self.poll_s)

    def describe(self) -> str:
        """What the kubelet did, for a failing test's message: pods started, live workers and
        routers, its errors, and the tail of every process's log."""
        lines = [f"started: {self.started}", f"workers: {self.urls}", f"routers: {self.routers}",
                 f"sync errors: {self.errors[-5:]}", f"thread alive: {self._thread.is_alive()}"]
        for proc in list(self.procs.values()):
            lines.append(f"--- {proc.name} ({'alive' if proc.alive() else 'exited'})\n{proc.log_tail(15)}")
        return "\n".join(lines)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for proc in self.procs.values():
            proc.stop()
        self.procs.clear()

    def __enter__(self) -> ProcessKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
