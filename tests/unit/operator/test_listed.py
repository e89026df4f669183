"""RayServices are listed, not watched: two lists make added/modified/deleted events, and an API
that goes away (its CRD deleted) deletes what was known instead of failing."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from kvpilot.operator import handlers
from kvpilot.operator.kube import KubeError
from kvpilot.operator.listed import Listed


def _obj(name: str, version: str, namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "resourceVersion": version}}


def test_two_lists_make_added_modified_and_deleted() -> None:
    listed = Listed()
    first = listed.update([_obj("a", "1"), _obj("b", "1")])
    assert [(t, m["name"]) for t, m in first] == [("ADDED", "a"), ("ADDED", "b")]
    assert listed.update([_obj("a", "1"), _obj("b", "1")]) == []   # nothing moved: nothing to do
    changes = listed.update([_obj("a", "2"), _obj("c", "1"), _obj("b", "1", namespace="other")])
    assert [(t, m["namespace"], m["name"]) for t, m in changes] == [
        ("MODIFIED", "ns", "a"), ("ADDED", "ns", "c"), ("ADDED", "other", "b"), ("DELETED", "ns", "b")]


class _Kube:
    def __init__(self) -> None:
        self.served = True
        self.items: list[dict[str, Any]] = []
        self.list_fails: int | None = None
        self.forgotten = 0

    def serves(self, kind: str) -> bool:
        assert kind == "RayService"
        return self.served

    def list(self, kind: str, namespace: str | None, selector: str) -> list[dict[str, Any]]:
        assert kind == "RayService" and selector == "app.kubernetes.io/managed-by=kvpilot-operator"
        if self.list_fails is not None:
            raise KubeError(self.list_fails, "failed")
        return self.items

    def forget_served(self, kind: str) -> None:
        self.forgotten += 1


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, str, bool]]:
    calls: list[tuple[str | None, str, bool]] = []
    monkeypatch.setattr(handlers, "_child_changed",
                        lambda memo, type_, meta, status_matters: calls.append((type_, meta["name"], status_matters)))
    return calls


def test_the_follower_hands_changes_on_and_a_vanished_api_deletes_what_it_knew(
        seen: list[tuple[str | None, str, bool]]) -> None:
    memo, kube, listed = kopf.Memo(), _Kube(), Listed()
    memo.kube = kube
    kube.items = [_obj("llm", "1")]
    handlers._poll_rayservices(memo, listed)
    handlers._poll_rayservices(memo, listed)
    assert seen == [("ADDED", "llm", True)]
    # The CRD is deleted between discovery and the list: a 404, not a failure; the owner hears of it.
    kube.list_fails = 404
    handlers._poll_rayservices(memo, listed)
    assert seen[-1] == ("DELETED", "llm", True) and kube.forgotten == 1
    # Discovery no longer serves it: nothing listed, nothing more to say.
    kube.served, kube.list_fails = False, None
    handlers._poll_rayservices(memo, listed)
    assert len(seen) == 2
    # Another error is the poll's failure (logged by the loop), and forgets nothing.
    kube.served, kube.list_fails = True, 500
    with pytest.raises(KubeError):
        handlers._poll_rayservices(memo, listed)
    assert len(seen) == 2
