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
