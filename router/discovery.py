"""Endpoint discovery from Kubernetes: ready pods matching a label selector become endpoints.

A watch (in a thread: the `kubernetes` client is synchronous) keeps the set of ready pods; on
every change the pool gets the full endpoint list, named by pod name, so ring membership follows
pod churn and a restarted pod that keeps its name keeps its keys. A pod counts when it has an
IP, is not being deleted and its Ready condition is True.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch

from kvpilot.kubeconfig import load_client
from kvpilot.router.config import Endpoint, Role

log = logging.getLogger("kvpilot.router.discovery")


def pod_endpoint(pod: Any, port: int, role: Role) -> Endpoint | None:
    """The endpoint a pod stands for, or None while it cannot take traffic."""
    status, meta = pod.status, pod.metadata
    if status is None or not status.pod_ip or meta.deletion_timestamp is not None:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in (status.conditions or []))
    if not ready:
        return None
    return Endpoint.model_validate({"name": meta.name, "url": f"http://{status.pod_ip}:{port}", "role": role})


class PodWatcher:
    """Watches one pool's pods and calls `publish(endpoints)` on the event loop after each change."""

    def __init__(self, namespace: str, selector: str, port: int, role: Role,
                 publish: Callable[[list[Endpoint]], None], loop: asyncio.AbstractEventLoop) -> None:
        self.namespace, self.selector, self.port, self.role = namespace, selector, port, role
        self.publish = publish
        self.loop = loop
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"discovery-{role}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self) -> None:
        api = client.CoreV1Api(load_client(connections=2))
        while not self._stop.is_set():
            try:
                self._list_and_watch(api)
            except Exception as e:  # the apiserver went away or the watch expired: list again
                if self._stop.is_set():
                    return
                log.warning("pod watch for %s failed (%s); relisting", self.selector, e)
                self._stop.wait(1.0)

    def _list_and_watch(self, api: client.CoreV1Api) -> None:
        pods = api.list_namespaced_pod(self.namespace, label_selector=self.selector)
        known: dict[str, Endpoint] = {}
        for pod in pods.items:
            ep = pod_endpoint(pod, self.port, self.role)
            if ep is not None:
                known[ep.name] = ep
        self._emit(known)
        self._watch = watch.Watch()
        for event in self._watch.stream(api.list_namespaced_pod, self.namespace, label_selector=self.selector,
                                        resource_version=pods.metadata.resource_version if pods.metadata else None,
                                        timeout_seconds=300):
            if self._stop.is_set():
                return
            pod = event["object"]
            ep = None if event["type"] == "DELETED" else pod_endpoint(pod, self.port, self.role)
            before = known.get(pod.metadata.name)
            if ep is None:
                known.pop(pod.metadata.name, None)
            else:
                known[ep.name] = ep
            if before != ep:
                self._emit(known)

    def _emit(self, known: dict[str, Endpoint]) -> None:
        endpoints = sorted(known.values(), key=lambda e: e.name)
        self.loop.call_soon_threadsafe(self.publish, endpoints)
