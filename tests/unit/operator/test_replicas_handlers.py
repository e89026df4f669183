"""An edit of `spec.<role>.replicas` on an LLMService is passed on to that pool, and nothing else is:
kopf selects the `field=` update handlers from its own diff (what the update handler used to parse by
hand), after the full reconcile, and `propagate_replicas` leaves a Degraded service's pools alone."""

from __future__ import annotations

import logging
from typing import Any, cast

import kopf
import pytest
from kopf._cogs.structs import diffs
from kopf._core.intents import causes

from kvpilot.crds import GROUP, VERSION
from kvpilot.operator import handlers, reconcile

BASE: dict[str, Any] = {"model": {"name": "m"}, "engine": {"type": "simulator"},
                        "prefill": {"replicas": 1}, "decode": {"replicas": 2}}


def _selected(old_spec: dict[str, Any], new_spec: dict[str, Any]) -> list[str]:
    """The ids of the handlers kopf runs, in order, for an update of the spec from old to new."""
    old, new = {"spec": old_spec}, {"spec": new_spec}
    body = kopf.Body(cast(kopf.RawBody, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMService",
                                         "metadata": {"name": "s", "namespace": "ns", "uid": "u"}, **new}))
    cause = causes.ChangingCause(
        logger=logging.getLogger("test"), indices=cast(Any, {}), memo=kopf.Memo(),
        resource=kopf.Resource(GROUP, VERSION, "llmservices"), patch=kopf.Patch(), body=body, initial=False,
        reason=kopf.Reason.UPDATE, diff=diffs.diff(old, new), old=cast(Any, old), new=cast(Any, new))
    return [h.id.split("/")[0] for h in kopf.get_default_registry()._changing.iter_handlers(cause)]


def test_only_a_replicas_edit_selects_the_replicas_handler_after_the_reconcile() -> None:
    assert _selected(BASE, {**BASE, "slo": {"ttftMs": 1500}}) == ["llmservice-update"]
    assert _selected(BASE, {**BASE, "decode": {"replicas": 3}}) == ["llmservice-update", "decode-replicas"]
    assert _selected(BASE, {**BASE, "decode": {"replicas": 2, "gpus": 1}}) == ["llmservice-update"]
    both = {**BASE, "prefill": {"replicas": 4}, "decode": {"replicas": 5}}
    assert _selected(BASE, both) == ["llmservice-update", "decode-replicas", "prefill-replicas"]
    # a switch to disaggregated adds the prefill block, and with it its replicas
    aggregated = {**{k: v for k, v in BASE.items() if k != "prefill"}, "mode": "aggregated"}
    assert _selected(aggregated, {**aggregated, "mode": "disaggregated", "prefill": {"replicas": 1}}) == [
        "llmservice-update", "prefill-replicas"]


def test_kopf_runs_every_selected_handler_in_one_cycle() -> None:
    """One cycle: kopf patches its bookkeeping once per edit, not once per handler."""
    handlers_ = list(kopf.get_default_registry()._changing._handlers)
    assert handlers.LIFECYCLE(handlers_, state=None) == handlers_


class _Kube:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        self.calls.append(("get", kind, name))
        return {}

    def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.calls.append(("patch", kind, name, str(patch["spec"]["replicas"])))


def _svc(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "s", "namespace": "ns"}, "spec": spec}


def test_the_edited_role_reaches_its_pool_only() -> None:
    kube = _Kube()
    reconcile.propagate_replicas(cast(Any, kube), _svc({**BASE, "decode": {"replicas": 3}}), {"decode"})
    assert kube.calls == [("get", "WorkerPool", "s-decode"), ("patch", "WorkerPool", "s-decode", "3")]
    kube = _Kube()   # aggregated: the decode block sizes the one pool
    spec = {**{k: v for k, v in BASE.items() if k != "prefill"}, "mode": "aggregated"}
    reconcile.propagate_replicas(cast(Any, kube), _svc(spec), {"decode", "prefill"})
    assert kube.calls == [("get", "WorkerPool", "s-worker"), ("patch", "WorkerPool", "s-worker", "2")]


@pytest.mark.parametrize("spec", [
    {**BASE, "engine": {"type": "simulator", "profile": "no-such-profile"}},   # UnknownProfile
    {**BASE, "decode": {"replicas": "many"}},                                  # InvalidSpec
    {"model": {"name": "m"}, "engine": {"type": "ray-serve"}, "mode": "aggregated",
     "decode": {"replicas": 2, "gpus": 1}},                                    # no WorkerPools there
], ids=["unknown-profile", "invalid", "ray-serve"])
def test_a_degraded_or_ray_service_passes_nothing_on(spec: dict[str, Any]) -> None:
    kube = _Kube()
    reconcile.propagate_replicas(cast(Any, kube), _svc(spec), {"decode", "prefill"})
    assert kube.calls == []
