"""A status computed from a stale read of the LLMService never lands over a newer spec's: the write
is fenced by the resourceVersion it was computed from, and a conflict recomputes from a fresh read."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from kvpilot.operator import handlers, reconcile
from kvpilot.operator.kube import KubeError


def _svc(mode: str, rv: str, status: dict[str, Any]) -> dict[str, Any]:
    pools = {"decode": {"gpus": 0}} | ({"prefill": {"gpus": 0}} if mode == "disaggregated" else {})
    return {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "s", "namespace": "ns", "uid": "u", "generation": 2, "resourceVersion": rv},
            "spec": {"model": {"name": "m"}, "engine": {"type": "simulator"}, "mode": mode, **pools},
            "status": status}


class _Kube:
    """The apiserver's view: the service now (aggregated, rv 2); a patch fenced by another rv is a 409."""

    def __init__(self, now: dict[str, Any]) -> None:
        self.now = now
        self.patches: list[dict[str, Any]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.now if kind == "LLMService" else None

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        return []

    def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
                    sub: str | None = None) -> dict[str, Any]:
        if patch.get("metadata", {}).get("resourceVersion") != self.now["metadata"]["resourceVersion"]:
            raise KubeError(409, "the object has been modified")
        self.patches.append(patch)
        return {}

    def max_node_gpus(self) -> int:
        return 8

    def serves(self, kind: str) -> bool:
        return False


def test_a_status_from_a_stale_read_is_recomputed_from_the_service_as_it_is() -> None:
    counts = {"desired": 1, "replicas": 1, "ready": 1}
    kube = _Kube(_svc("aggregated", "2", {"prefill": counts, "decode": counts}))
    stale = _svc("disaggregated", "1", {"decode": counts})   # read before the switch to aggregated
    reconcile.refresh_service_status(kube, stale)  # type: ignore[arg-type]
    assert len(kube.patches) == 1
    assert kube.patches[0]["status"]["prefill"] is None   # from the fresh read: aggregated has no prefill


def test_a_conflict_on_the_fresh_read_too_is_an_error_not_a_loop() -> None:
    kube = _Kube(_svc("aggregated", "2", {}))
    kube.now = {**kube.now, "metadata": {**kube.now["metadata"], "resourceVersion": "3"}}
    fresh_but_moving = _svc("aggregated", "2", {})

    class _Moving(_Kube):
        def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
            return fresh_but_moving   # another writer keeps winning

    moving = _Moving(kube.now)
    try:
        reconcile.refresh_service_status(moving, _svc("aggregated", "1", {}))  # type: ignore[arg-type]
    except KubeError as err:
        assert err.status == 409
    else:
        raise AssertionError("a second conflict must surface (kopf retries the handler)")


def test_a_handler_that_loses_twice_is_retried_in_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not after kopf's default minute, during which a create handler's edits reach no update handler."""
    status = 409

    def failing(*_: Any, **__: Any) -> reconcile.Outcome:
        raise KubeError(status, "the object has been modified")

    monkeypatch.setattr(reconcile, "reconcile_service", failing)
    memo = kopf.Memo()
    memo.kube = None   # the reconcile is replaced: nothing reaches the apiserver
    body = kopf.Body(_svc("aggregated", "1", {}))
    with pytest.raises(kopf.TemporaryError) as caught:
        handlers.llmservice_apply(body=body, memo=memo)
    assert caught.value.delay == 1
    status = 500   # anything but a conflict keeps kopf's own back-off
    with pytest.raises(KubeError):
        handlers.llmservice_apply(body=body, memo=memo)
