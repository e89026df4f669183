"""Every rendered child is owned through `kopf.adopt`: garbage collection deletes it with its owner
(controller, blockOwnerDeletion), it lives in the owner's namespace and inherits the owner's labels
without losing the operator's own, and the owner's labels never reach a pod template or selector
(that would roll pods, or orphan them, whenever someone relabels an LLMService)."""

from __future__ import annotations

from typing import Any

from kvpilot import names
from kvpilot.crds import LLMServiceSpec, WorkerPoolSpec
from kvpilot.operator import render, render_pool

SERVICE_BODY: dict[str, Any] = {
    "apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService",
    "metadata": {"name": "llama", "namespace": "ml", "uid": "uid-1",
                 # a user's label, and one that collides with a label the operator renders
                 "labels": {"team": "search", names.LABEL_COMPONENT: "mine"}}}
SPEC = LLMServiceSpec.model_validate({"model": {"name": "m"}, "engine": {"type": "simulator"},
                                      "prefill": {"replicas": 1}, "decode": {"replicas": 2}})


def _ref(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _service_children(owner: render.Owner) -> list[dict[str, Any]]:
    return [*render.workerpools(SPEC, owner), *render.router_objects(SPEC, owner),
            render.admin_secret(owner, "t"), render.pod_monitor(owner)]


def _pool_body(pool: dict[str, Any]) -> dict[str, Any]:
    """The WorkerPool as the apiserver returns it: the rendered object plus a uid."""
    return {**pool, "metadata": {**pool["metadata"], "uid": "uid-pool"}}


def _pool_children(pool_body: dict[str, Any]) -> list[dict[str, Any]]:
    owner = render.Owner.of(pool_body)
    spec = WorkerPoolSpec.model_validate(pool_body["spec"])
    return [render_pool.pool_deployment(spec, owner), render_pool.pool_disruption_budget(spec, owner),
            render_pool.pool_service(spec, owner)]


def test_every_child_of_a_service_has_one_controlling_owner_reference_in_its_namespace() -> None:
    children = _service_children(render.Owner.of(SERVICE_BODY))
    assert {c["kind"] for c in children} == {"WorkerPool", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                                             "Deployment", "PodDisruptionBudget", "Service", "Secret", "PodMonitor"}
    for child in children:
        assert child["metadata"]["ownerReferences"] == [_ref(SERVICE_BODY)], child["kind"]
        assert child["metadata"]["namespace"] == "ml"


def test_every_child_of_a_pool_is_owned_by_the_pool() -> None:
    pool = _pool_body(render.workerpools(SPEC, render.Owner.of(SERVICE_BODY))[1])
    for child in _pool_children(pool):
        assert child["metadata"]["ownerReferences"] == [_ref(pool)], child["kind"]
        assert child["metadata"]["namespace"] == "ml" and child["metadata"]["name"] == "llama-decode"


def test_children_inherit_the_owners_labels_but_keep_their_own() -> None:
    owner = render.Owner.of(SERVICE_BODY)
    for child in _service_children(owner):
        labels = child["metadata"]["labels"]
        assert labels["team"] == "search", child["kind"]
        assert labels[names.LABEL_COMPONENT] != "mine" and labels[names.LABEL_MANAGED_BY] == render.MANAGER
    # ... and through the pools, the pools' children too.
    pool = _pool_body(render.workerpools(SPEC, owner)[0])
    assert all(c["metadata"]["labels"]["team"] == "search" for c in _pool_children(pool))
    assert SERVICE_BODY["metadata"]["labels"] == {"team": "search", names.LABEL_COMPONENT: "mine"}  # not edited


def test_the_owners_labels_reach_no_pod_template_or_selector() -> None:
    plain = render.Owner("kvpilot.io/v1alpha1", "LLMService", "llama", "ml", "uid-1")
    labelled = render.Owner.of(SERVICE_BODY)

    def pods(owner: render.Owner) -> list[Any]:
        router = next(o for o in render.router_objects(SPEC, owner) if o["kind"] == "Deployment")
        pool = _pool_body(render.workerpools(SPEC, owner)[1])
        deployment, budget, service = _pool_children(pool)
        return [router["spec"], deployment["spec"], budget["spec"], service["spec"]]

    assert pods(labelled) == pods(plain)


def test_rendering_twice_adds_no_second_reference() -> None:
    owner = render.Owner.of(SERVICE_BODY)
    budget = next(o for o in render.router_objects(SPEC, owner) if o["kind"] == "PodDisruptionBudget")
    assert render.adopt(budget, owner)["metadata"]["ownerReferences"] == [_ref(SERVICE_BODY)]
