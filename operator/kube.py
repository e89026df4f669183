"""A small typed shell over the Kubernetes REST API: get, list, create, server-side apply, delete.

One generic path builder for every kind the operator touches keeps server-side apply uniform (the
generated per-kind clients each spell it differently) and makes the RBAC in the chart easy to audit:
the kinds the operator can touch are exactly the ones in `KINDS`.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kvpilot.crds import API_VERSION
from kvpilot.operator.metrics import API_REQUESTS
from kvpilot.operator.render import MANAGER, MONITORING_API

Obj = dict[str, Any]
KINDS: dict[str, tuple[str, str]] = {
    "LLMService": (API_VERSION, "llmservices"),
    "WorkerPool": (API_VERSION, "workerpools"),
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "ConfigMap": ("v1", "configmaps"),
    "Secret": ("v1", "secrets"),  # create only: the router's admin token
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "PodMonitor": (MONITORING_API, "podmonitors"),  # only when the Prometheus Operator's CRDs exist
    "RayService": ("ray.io/v1", "rayservices"),  # engine ray-serve, only when KubeRay's CRDs exist
    "KopfPeering": ("kopf.dev/v1", "kopfpeerings"),  # read only: kopf itself writes them
    "ClusterKopfPeering": ("kopf.dev/v1", "clusterkopfpeerings"),
    "Event": ("v1", "events"),  # create only: phase changes the periodic resync finds
}
PLURALS = {plural for _, plural in KINDS.values()} | {"nodes"}
NODE_CACHE_SECONDS = 10.0
DISCOVERY_CACHE_SECONDS = 10.0


class KubeError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status


def path(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    api_version, plural = KINDS[kind]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base, "namespaces", namespace, plural] if namespace else [base, plural]
    parts += [p for p in (name, sub) if p]
    return "/".join(p for p in parts if p)


def _resource(url: str) -> str:
    """The resource a request is about, for the request counter: `deployments`, `llmservices/status`…"""
    parts = url.strip("/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in PLURALS and (i < 2 or parts[i - 1] != "namespaces"):
            sub = parts[i + 2] if len(parts) > i + 2 else ""
            return f"{parts[i]}/{sub}" if sub else parts[i]
    return "discovery"


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self._gpus: tuple[float, int] | None = None
        self._served: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()
        self._nodes_lock = threading.Lock()  # one node list at a time; the others wait for its answer

    def request(self, method: str, url: str, body: Obj | bytes | None = None, query: dict[str, str] | None = None,
                content_type: str = "application/json") -> Obj:
        API_REQUESTS.labels(method, _resource(url)).inc()
        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = self.api.param_serialize(method, url, query_params=list((query or {}).items()),
                                          header_params=headers, body=body, auth_settings=["BearerToken"])
        try:
            resp = self.api.call_api(*params, _request_timeout=30)
        except ApiException as err:
            raise KubeError(err.status or 0, str(err.body or err.reason)) from err
        data: bytes = resp.read()  # type: ignore[no-untyped-call]
        if not 200 <= resp.status < 300:
            raise KubeError(resp.status, data.decode(errors="replace") if data else resp.reason or "")
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            return self.request("GET", path(kind, namespace, name))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, selector: str) -> list[Obj]:
        items: list[Obj] = self.request("GET", path(kind, namespace), query={"labelSelector": selector})["items"]
        return items

    def create(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        return self.request("POST", path(obj["kind"], meta["namespace"]), obj, query={"fieldManager": MANAGER})

    def post_event(self, involved: Obj, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about `involved`, as `kopf.event` posts one. kopf can post only from its
        handlers' tasks (its event queue lives in their context); the periodic resync is a task of
        the operator's own, so it posts through here."""
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.create({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": involved["apiVersion"], "kind": involved["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": MANAGER}, "reportingComponent": MANAGER,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        })

    def apply(self, obj: Obj) -> Obj:
        """Server-side apply as the operator's field manager, taking over conflicting fields: a manual
        edit of a field the operator renders is reverted, fields it does not render are left alone."""
        meta = obj["metadata"]
        # Serialized here, as UTF-8: the client's own json.dumps escapes a character outside the BMP
        # (an emoji in a model name) as a surrogate pair, "\\ud83d\\udca5", which JSON allows but the
        # apiserver's YAML decoder rejects (400 "invalid Unicode character escape code"), so the
        # pool's Deployment was never made (found by tests/e2e/operator/test_spec_fuzz.py).
        body = json.dumps(obj, ensure_ascii=False).encode()
        return self.request("PATCH", path(obj["kind"], meta["namespace"], meta["name"]), body,
                            query={"fieldManager": MANAGER, "force": "true"},
                            content_type="application/apply-patch+yaml")

    def merge_patch(self, kind: str, namespace: str, name: str, patch: Obj, sub: str | None = None) -> Obj:
        return self.request("PATCH", path(kind, namespace, name, sub), patch, query={"fieldManager": MANAGER},
                            content_type="application/merge-patch+json")

    def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", path(kind, namespace, name), {"propagationPolicy": "Background"})
        except KubeError as err:
            if err.status != 404:
                raise

    def max_node_gpus(self) -> int:
        """The most nvidia.com/gpu any node can allocate, cached briefly: every reconcile asks."""
        with self._nodes_lock:
            if self._gpus is not None and time.monotonic() - self._gpus[0] < NODE_CACHE_SECONDS:
                return self._gpus[1]
            # resourceVersion=0: from the apiserver's watch cache, not a quorum read of every node in etcd
            nodes = self.request("GET", "/api/v1/nodes", query={"resourceVersion": "0"})["items"]
            most = max((int((n.get("status") or {}).get("allocatable", {}).get("nvidia.com/gpu", 0)) for n in nodes),
                       default=0)
            self._gpus = (time.monotonic(), most)
            return most

    def serves(self, kind: str) -> bool:
        """Whether the apiserver serves this kind now (a CRD such as the Prometheus Operator's may be
        installed or removed at any time), from API discovery, cached briefly: every reconcile asks.
        Discovery is open to every authenticated account, so this needs no RBAC of its own."""
        with self._lock:
            seen = self._served.get(kind)
            if seen is not None and time.monotonic() - seen[0] < DISCOVERY_CACHE_SECONDS:
                return seen[1]
        api_version, plural = KINDS[kind]
        try:
            resources = self.request("GET", "/api/v1" if api_version == "v1" else f"/apis/{api_version}")["resources"]
            served = any(r.get("name") == plural for r in resources)
        except KubeError as err:
            if err.status != 404:
                raise
            served = False
        with self._lock:
            self._served[kind] = (time.monotonic(), served)
        return served

    def forget_served(self, kind: str) -> None:
        with self._lock:
            self._served.pop(kind, None)
