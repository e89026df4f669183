"""The periodic resync reconciles every LLMService even when one of them cannot be reconciled, and
re-applies each pool's own children (a pool that did not change sends no watch event)."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from kvpilot.operator import handlers, reconcile, render
from kvpilot.operator.kube import KubeError


class _Kube:
    def __init__(self, names: list[str]) -> None:
        self.items = [{"metadata": {"namespace": "ns", "name": n}} for n in names]

    def request(self, method: str, url: str) -> dict[str, Any]:
        assert method == "GET" and url.endswith("/llmservices")
        return {"items": self.items}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return next((s for s in self.items if s["metadata"]["name"] == name), None)


def test_one_failing_service_does_not_stop_the_resync_of_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def reconcile_service(kube: Any, svc: dict[str, Any], *_: Any, **__: Any) -> reconcile.Outcome:
        name = svc["metadata"]["name"]
        seen.append(name)
        if name == "terminating":
            raise RuntimeError("namespace is being terminated")
        return reconcile.Outcome("Ready", "Ready", "")

    monkeypatch.setattr(reconcile, "reconcile_service", reconcile_service)
    memo = kopf.Memo()
    memo.kube = _Kube(["a", "terminating", "b"])
    handlers._resync_all(memo)
    assert seen == ["a", "terminating", "b"]


class _Cluster:
    """Enough of `Kube` for one reconcile: pools exist (create says 409), every apply is recorded."""

    def __init__(self, svc: dict[str, Any]) -> None:
        self.svc = svc
        self.applied: list[tuple[str, str]] = []
        self.pools: list[dict[str, Any]] = []

    def request(self, method: str, url: str) -> dict[str, Any]:
        return {"items": [self.svc]}

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        if obj["kind"] == "WorkerPool":
            self.pools.append({**obj, "metadata": {**obj["metadata"], "uid": f"uid-{obj['metadata']['name']}"}})
        raise KubeError(409, "exists")

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.applied.append((obj["kind"], obj["metadata"]["name"]))
        return obj

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self.pools if kind == "WorkerPool" else []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.svc if kind == "LLMService" else None

    def merge_patch(self, *_: Any, **__: Any) -> dict[str, Any]:
        return {}

    def max_node_gpus(self) -> int:
        return 8

    def serves(self, kind: str) -> bool:
        return False


def test_the_resync_reapplies_each_pools_deployment_budget_and_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "_announce", lambda *_: None)   # kopf's Events need a running operator
    svc = {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService",
           "metadata": {"name": "s", "namespace": "ns", "uid": "uid-s", "generation": 1},
           "spec": {"model": {"name": "m"}, "engine": {"type": "simulator"}, "prefill": {"gpus": 0},
                    "decode": {"gpus": 0}}}
    cluster = _Cluster(svc)
    memo = kopf.Memo()
    memo.kube = cluster
    handlers._resync_all(memo)
    for pool in ("s-prefill", "s-decode"):
        assert {(kind, pool) for kind in ("Deployment", "PodDisruptionBudget", "Service")} <= set(cluster.applied)
    # an event-driven reconcile of the service leaves the pools' children to the pools' own events
    cluster.applied.clear()
    reconcile.reconcile_service(cluster, svc)  # type: ignore[arg-type]
    assert ("Deployment", "s-decode") not in cluster.applied
    assert ("Deployment", render.router_name("s")) in cluster.applied


def test_the_resync_runs_on_the_handlers_executor_in_its_tasks_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """On kopf's executor so --max-workers bounds it too, and in the task's context: kopf posts Events
    (a phase change) through a context variable, which a bare executor thread would not have."""
    import asyncio
    import contextvars
    import threading
    from concurrent.futures import ThreadPoolExecutor

    queue: contextvars.ContextVar[str] = contextvars.ContextVar("queue")
    seen: list[tuple[str, str]] = []
    ran = threading.Event()

    def resync_all(memo: kopf.Memo) -> None:
        seen.append((threading.current_thread().name, queue.get("missing")))
        ran.set()

    monkeypatch.setattr(handlers, "_resync_all", resync_all)

    async def main() -> None:
        queue.set("kopf's event queue")
        memo = kopf.Memo(resync_seconds=0.01, executor=ThreadPoolExecutor(1, thread_name_prefix="kopf-handlers"))
        task = asyncio.get_running_loop().create_task(handlers._resync_forever(memo))
        while not ran.is_set():
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert seen[0][0].startswith("kopf-handlers") and seen[0][1] == "kopf's event queue"


class _Recording(_Kube):
    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.events: list[tuple[str, str, str, str]] = []

    def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((involved["metadata"]["name"], type_, reason, message))


def test_the_resync_announces_a_phase_change_without_kopfs_event_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resync runs in the operator's own task, where `kopf.event` has no queue (LookupError):
    a phase it finds changed is posted through the API, and the services after it are resynced."""
    seen: list[str] = []

    def reconcile_service(kube: Any, svc: dict[str, Any], *_: Any, **__: Any) -> reconcile.Outcome:
        name = svc["metadata"]["name"]
        seen.append(name)
        return reconcile.Outcome("Ready", "Degraded", "router 0/2 ready") if name == "a" else \
            reconcile.Outcome("Ready", "Ready", "")

    monkeypatch.setattr(reconcile, "reconcile_service", reconcile_service)
    memo = kopf.Memo()
    memo.kube = _Recording(["a", "b"])
    handlers._resync_all(memo)
    assert seen == ["a", "b"]
    assert memo.kube.events == [("a", "Warning", "Degraded", "router 0/2 ready")]
