"""Where the planner's decisions land: one small interface, a Kubernetes and a local actuator.

An actuator answers two questions about a pool — how many replicas are asked for and ready,
and where their metrics are — and does one thing: set the replica count. The Kubernetes one
writes the WorkerPool's scale subresource (the same door `kubectl scale`, HPA and KEDA use, so
the operator's Deployment follows and nothing is fought over). Before a scale-in it marks each
pod's `controller.kubernetes.io/pod-deletion-cost` so the ReplicaSet removes the pod that loses
the least: the one with the fewest running requests and the least KV cache in use.
"""

from __future__ import annotations

import datetime as dt
import logging
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

from kvpilot import vllm_metrics as m
from kvpilot.autoscaler.signals import parse_engine_metrics
from kvpilot.crds import API_VERSION
from kvpilot.names import LABEL_COMPONENT, LABEL_SERVICE

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
REFUSING = "refusing to scale"   # how a conflict's reason starts
log = logging.getLogger("kvpilot.autoscaler")


@dataclass(slots=True, frozen=True)
class PoolRef:
    namespace: str
    service: str
    role: str            # prefill | decode | aggregated
    name: str            # the WorkerPool's name


@dataclass(slots=True, frozen=True)
class PoolState:
    asked: int                 # spec.replicas
    ready: int                 # replicas serving
    metrics_urls: list[str]    # base URLs of the ready replicas (…/metrics is scraped)
    router_urls: tuple[str, ...] = ()  # the service's routers: requests they hold are demand too
    unschedulable: int = 0     # pods Pending unscheduled past the deadline: no GPU for them now
    conflict: str = ""         # another scaler that targets this pool (an HPA): nothing is decided


class Actuator(Protocol):
    def observe(self, pool: PoolRef) -> PoolState | None: ...

    def scale(self, pool: PoolRef, replicas: int) -> None: ...


def deletion_costs(texts: dict[str, str | None]) -> dict[str, int]:
    """Pod → deletion cost from its scraped metrics: running requests dominate (removing a busy
    replica interrupts work), then KV usage (cache that would be lost). Unscrapable pods cost 0,
    so a broken replica goes first."""
    costs: dict[str, int] = {}
    for pod, text in texts.items():
        gauges = parse_engine_metrics(text)[0] if text else {}
        running, kv = gauges.get(m.RUNNING, 0.0), min(1.0, gauges.get(m.KV_USAGE, 0.0))
        costs[pod] = int(running * 1000 + kv * 999)
    return costs


def hpa_conflict(pool: PoolRef, targets: list[tuple[str, str | None, str, str]]) -> str:
    """'' or why not to act: the HPAs among (name, apiVersion, kind, target name) that target
    this pool's WorkerPool."""
    group = API_VERSION.split("/")[0]
    names = sorted(n for n, api, kind, target in targets
                   if kind == "WorkerPool" and target == pool.name and (api or "").split("/")[0] == group)
    if not names:
        return ""
    return f"{REFUSING}: HorizontalPodAutoscaler {', '.join(names)} also targets WorkerPool {pool.name}"


def unschedulable(pod: Any, now: dt.datetime, deadline_s: float) -> bool:
    """A pod the scheduler has not placed (Pending, no node, PodScheduled not True) for longer
    than `deadline_s`: in a GPU pool that means no GPU is free for it. Younger ones are still
    starting; the deadline keeps a normal scheduling delay from reading as a shortage."""
    status = pod.status
    if status is None or status.phase != "Pending" or pod.spec.node_name:
        return False
    if any(c.type == "PodScheduled" and c.status == "True" for c in status.conditions or []):
        return False
    created = pod.metadata.creation_timestamp
    return created is not None and (now - created).total_seconds() > deadline_s


class KubernetesActuator:
    """WorkerPool scale subresource + pod deletion costs, through the official client."""

    def __init__(self, api: Any, scrape_timeout_s: float = 2.0, pending_deadline_s: float = 120.0) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.hpa: Any = client.AutoscalingV2Api(api)
        self._hpa_unreadable = False
        self.group, self.version = API_VERSION.split("/")
        self.timeout = scrape_timeout_s
        self.pending_deadline_s = pending_deadline_s

    def _pods(self, pool: PoolRef, selector: str) -> list[Any]:
        pods: list[Any] = self.core.list_namespaced_pod(pool.namespace, label_selector=selector).items
        return [p for p in pods if p.metadata.deletion_timestamp is None]

    def _workerpool(self, pool: PoolRef) -> dict[str, Any]:
        wp: dict[str, Any] = self.custom.get_namespaced_custom_object(  # type: ignore[assignment]
            self.group, self.version, pool.namespace, "workerpools", pool.name)
        return wp

    @staticmethod
    def _ready(pod: Any) -> bool:
        conds = pod.status.conditions or []
        return bool(pod.status.pod_ip) and any(c.type == "Ready" and c.status == "True" for c in conds)

    @staticmethod
    def _url(pod: Any) -> str:
        ports = pod.spec.containers[0].ports or []
        port = ports[0].container_port if ports else 8000
        return f"http://{pod.status.pod_ip}:{port}"

    def observe(self, pool: PoolRef) -> PoolState | None:
        try:
            wp = self._workerpool(pool)
        except Exception as err:
            if getattr(err, "status", None) == 404:
                return None
            raise
        selector = (wp.get("status") or {}).get("selector")
        if not selector:
            return None
        ready = [p for p in self._pods(pool, selector) if self._ready(p)]
        routers = [p for p in self._pods(pool, f"{LABEL_SERVICE}={pool.service},{LABEL_COMPONENT}=router")
                   if self._ready(p)]
        now = dt.datetime.now(dt.UTC)
        stuck = sum(1 for p in self._pods(pool, selector) if unschedulable(p, now, self.pending_deadline_s))
        return PoolState(int(wp["spec"].get("replicas", 0)), len(ready), sorted(self._url(p) for p in ready),
                         tuple(sorted(self._url(p) for p in routers)), stuck, self._hpa_conflict(pool))

    def _hpa_conflict(self, pool: PoolRef) -> str:
        """The HorizontalPodAutoscalers that scale this WorkerPool too (two writers of one scale
        subresource fight: each undoes the other every interval), named for the status."""
        try:
            hpas = self.hpa.list_namespaced_horizontal_pod_autoscaler(pool.namespace).items
        except Exception as err:  # RBAC without horizontalpodautoscalers list: act, and say once
            if not self._hpa_unreadable:
                log.warning("cannot check for HPAs on WorkerPools (%s); grant list on "
                            "autoscaling/horizontalpodautoscalers", getattr(err, "reason", err))
                self._hpa_unreadable = True
            return ""
        return hpa_conflict(pool, [(h.metadata.name, h.spec.scale_target_ref.api_version,
                                    h.spec.scale_target_ref.kind, h.spec.scale_target_ref.name) for h in hpas])

    def _mark_deletion_costs(self, pool: PoolRef, selector: str) -> None:
        texts: dict[str, str | None] = {}
        for pod in self._pods(pool, selector):
            text = None
            if self._ready(pod):
                try:
                    with urllib.request.urlopen(self._url(pod) + "/metrics", timeout=self.timeout) as resp:
                        text = resp.read().decode()
                except OSError:
                    pass
            texts[pod.metadata.name] = text
        for name, cost in deletion_costs(texts).items():
            self.core.patch_namespaced_pod(name, pool.namespace,
                                           {"metadata": {"annotations": {DELETION_COST: str(cost)}}})

    def scale(self, pool: PoolRef, replicas: int) -> None:
        wp = self._workerpool(pool)
        selector = (wp.get("status") or {}).get("selector")
        if selector and replicas < int(wp["spec"].get("replicas", 0)):
            self._mark_deletion_costs(pool, selector)
        self.custom.patch_namespaced_custom_object_scale(self.group, self.version, pool.namespace, "workerpools",
                                                         pool.name, {"spec": {"replicas": replicas}})
