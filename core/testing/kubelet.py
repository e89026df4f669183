"""A test-only "process kubelet": kwok pods that run `kvpilot sim serve` become real processes.

kwok gives pods a phase and a 127.64.x IP but runs nothing. For end-to-end tests of the
autoscaler and router on the real API, this watches the pods of one label selector and starts
each pod's own container command (the args the operator rendered) as a local process bound to
the pod's IP, and stops it when the pod goes away. So the worker that answers at a pod's IP is
the one the operator asked for, and scaling a WorkerPool really adds or removes servers.
Only simulator pods are supported: anything else would need the real engine.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

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
        self.started: list[str] = []                  # pod names, in start order
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
                argv = worker_argv(pod["spec"]["containers"][0], ip) + self.extra
                self.procs[uid] = ManagedProcess(meta["name"], argv, self.dir / f"{meta['name']}.log")
                port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
                self.urls[uid] = f"http://{ip}:{port}"
                self.started.append(meta["name"])
        for uid in set(self.procs) - live:
            self.procs.pop(uid).stop()
            self.urls.pop(uid, None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sync()
            self._stop.wait(self.poll_s)

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
