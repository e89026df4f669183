"""Which child events mean someone else edited a managed object (so the operator must re-apply it)."""

from __future__ import annotations

from typing import Any

from kvpilot.operator.reconcile import edited_by_others
from kvpilot.operator.render import MANAGER

OURS = {"manager": MANAGER, "operation": "Apply", "fieldsV1": {"f:metadata": {}, "f:spec": {"f:replicas": {}}}}
STATUS = {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
          "fieldsV1": {"f:status": {"f:replicas": {}}}}
REVISION = {"manager": "kube-controller-manager", "operation": "Update",
            "fieldsV1": {"f:metadata": {"f:annotations": {"f:deployment.kubernetes.io/revision": {}}}}}


def _meta(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"name": "x", "managedFields": list(entries)}


def test_our_apply_and_controllers_bookkeeping_are_not_edits() -> None:
    assert not edited_by_others(_meta())
    assert not edited_by_others(_meta(OURS, STATUS, REVISION))


def test_kubectl_scale_edit_or_patch_are_edits() -> None:
    scale = {"manager": "kubectl", "operation": "Update", "subresource": "scale",
             "fieldsV1": {"f:spec": {"f:replicas": {}}}}
    edit = {"manager": "kubectl-edit", "operation": "Update", "fieldsV1": {"f:data": {"f:router.yaml": {}}}}
    assert edited_by_others(_meta(OURS, STATUS, scale))
    assert edited_by_others(_meta(OURS, edit))


def test_an_edit_the_apply_cannot_take_back_is_answered_once_and_a_new_edit_again() -> None:
    """`kubectl rollout restart` owns an annotation the operator never renders: after one re-apply
    the same edit must not re-apply on every later event of the object (the Deployment's status moves)."""
    from kvpilot.operator.reconcile import Answered

    restart = {"manager": "kubectl-rollout", "operation": "Update", "time": "2026-01-01T00:00:00Z",
               "fieldsV1": {"f:spec": {"f:template": {"f:metadata": {"f:annotations": {}}}}}}
    answered = Answered(size=2)
    event = {**_meta(OURS, STATUS, restart), "uid": "u1"}
    assert answered.new(event)
    answered.answered(event)
    assert not answered.new(event)   # the Deployment's next status events: nothing more to do
    again = {**_meta(OURS, STATUS, {**restart, "time": "2026-01-01T00:05:00Z"}), "uid": "u1"}
    assert answered.new(again)       # a second restart is a new edit
    assert not answered.new({**_meta(OURS, STATUS), "uid": "u2"})
    for uid in ("u2", "u3"):         # bounded: the oldest answer is forgotten, so it is answered again
        answered.answered({**_meta(OURS, restart), "uid": uid})
    assert answered.new(event) and not answered.new({**_meta(OURS, restart), "uid": "u3"})
