"""The periodic resync reconciles every LLMService even when one of them cannot be reconciled."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from kvpilot.operator import handlers, reconcile


class _Kube:
    def __init__(self, names: list[str]) -> None:
        self.items = [{"metadata": {"namespace": "ns", "name": n}} for n in names]

    def request(self, method: str, url: str) -> dict[str, Any]:
        assert method == "GET" and url.endswith("/llmservices")
        return {"items": self.items}


def test_one_failing_service_does_not_stop_the_resync_of_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def reconcile_service(kube: Any, svc: dict[str, Any], *_: Any) -> reconcile.Outcome:
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
