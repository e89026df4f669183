"""The kopf shell: which watch events call which reconcile function. No decisions live here.

Handlers are sync functions (kopf runs them in its thread pool) over `kvpilot.operator.reconcile`.
kopf keeps its own bookkeeping in annotations (not in `status`, which the CRD schema owns), and the
operator adds no finalizers, so deleting an LLMService never waits for the operator: the
garbage collector removes the children through their owner references.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from kvpilot import names
from kvpilot.crds import GROUP, VERSION
from kvpilot.kubeconfig import load_client
from kvpilot.operator import peers, reconcile, render
from kvpilot.operator.coalesce import Coalescer
from kvpilot.operator.kube import Kube, KubeError
from kvpilot.operator.listed import Listed
from kvpilot.operator.metrics import measured
from kvpilot.operator.poddefaults import NO_DEFAULTS

log = logging.getLogger("kvpilot.operator")
MANAGED = {names.LABEL_MANAGED_BY: render.MANAGER}
RESYNC_SECONDS = 60.0
RAYSERVICE_POLL_SECONDS = 5.0   # RayServices are listed, not watched (`kvpilot.operator.listed`)
# Every handler a change selects runs in one processing cycle (kopf's default, `asap`, runs one per
# cycle and patches its progress into annotations between them): an edit of spec.<role>.replicas
# selects `llmservice_apply` (its update handler) and `llmservice_replicas` and still costs kopf one patch, as when one
# handler parsed the diff by hand.
LIFECYCLE = kopf.lifecycles.all_at_once


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.kvpilot.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.kvpilot.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # Events only for explicit transitions and failures
    settings.execution.max_workers = memo.get("max_workers", 16)
    settings.peering.lifetime = memo.get("peering_lifetime", 60)
    memo.kube = Kube(load_client())
    # Refreshes and the resync run on kopf's handler executor, so `--max-workers` bounds all the
    # operator's reconciling threads at once, not only the handlers'.
    memo.executor = settings.execution.executor
    memo.coalescer = Coalescer(memo.get("refresh_delay", 0.5), executor=memo.executor)
    memo.answered = reconcile.Answered()
    memo.resync = asyncio.get_running_loop().create_task(_resync_forever(memo))
    memo.follow_ray = asyncio.get_running_loop().create_task(_follow_rayservices_forever(memo))


@kopf.on.cleanup()
async def stop_background(memo: kopf.Memo, **_: Any) -> None:
    coalescer = memo.get("coalescer")
    if coalescer is not None:
        coalescer.shutdown()
    for task in (memo.get("resync"), memo.get("follow_ray")):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _every(memo: kopf.Memo, seconds: float, work: Callable[[], None], what: str) -> None:
    """`work` every `seconds` on kopf's handler executor, in this task's context, as asyncio.to_thread
    would (kopf's event queue is not in it: phase changes found there are posted by `Kube.post_event`)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            context = contextvars.copy_context()
            await asyncio.get_running_loop().run_in_executor(memo.get("executor"), context.run, work)
        except Exception:
            log.exception("%s failed", what)


async def _resync_forever(memo: kopf.Memo) -> None:
    """Watches can miss nothing in theory and something in practice: reconcile everything now and then.
    A task of our own rather than a kopf timer: timers make kopf put a finalizer on every LLMService,
    and then deleting one waits for a running operator."""
    await _every(memo, memo.get("resync_seconds", RESYNC_SECONDS), lambda: _resync_all(memo), "periodic resync")


async def _follow_rayservices_forever(memo: kopf.Memo) -> None:
    """The managed RayServices, listed every few seconds while the apiserver serves them, as their
    watch events would be handled: listed, not watched, because a kopf watch on a CRD that is
    deleted can take the whole operator down (`kvpilot.operator.listed`)."""
    listed = Listed()
    await _every(memo, memo.get("rayservice_poll_seconds", RAYSERVICE_POLL_SECONDS),
                 lambda: _poll_rayservices(memo, listed), "following RayServices")


def _poll_rayservices(memo: kopf.Memo, listed: Listed) -> None:
    kube: Kube = memo.kube
    if _blocking_peers(memo):
        return
    items: list[dict[str, Any]] = []
    if kube.serves("RayService"):
        selector = ",".join(f"{k}={v}" for k, v in MANAGED.items())
        try:
            for namespace in memo.get("namespaces") or [None]:
                items += kube.list("RayService", namespace, selector)
        except KubeError as err:
            if err.status != 404:
                raise
            kube.forget_served("RayService")
            items = []   # gone with their CRD: their owners learn it below
    for type_, meta in listed.update(items):
        _child_changed(memo, type_, meta, status_matters=True)


def _blocking_peers(memo: kopf.Memo) -> list[str]:
    """Peers that kopf lets act instead of this replica (kopf pauses its handlers, not this task)."""
    me: peers.Me | None = memo.get("me")
    if me is None:  # standalone
        return []
    kube: Kube = memo.kube
    found = [kube.get("KopfPeering", ns, me.peering) for ns in memo.get("namespaces") or []] or [
        kube.get("ClusterKopfPeering", "", me.peering)]
    now = datetime.now(UTC)
    return [peer for obj in found for peer in peers.blocking_peers(obj or {}, me, now)]


def _resync_all(memo: kopf.Memo) -> None:
    blocking = _blocking_peers(memo)
    if blocking:
        log.info("standing by for %s: no periodic resync", ", ".join(blocking))
        return
    kube: Kube = memo.kube
    services = []
    for namespace in memo.get("namespaces") or [None]:
        url = "/apis/{}/{}{}/llmservices".format(GROUP, VERSION, f"/namespaces/{namespace}" if namespace else "")
        services += kube.request("GET", url)["items"]
    log.info("periodic resync of %d LLMServices", len(services))
    for listed in services:
        # One service that cannot be reconciled (its namespace terminating, an API error) must not
        # cost the others their resync: log it and go on.
        namespace, name = listed["metadata"]["namespace"], listed["metadata"]["name"]
        try:
            # Read again: the list is as old as the resync of every service before this one.
            svc = kube.get("LLMService", namespace, name)
            if svc is None:
                continue   # deleted since the list
            with measured("LLMService"):
                outcome = reconcile.reconcile_service(kube, svc, memo.get("image"), memo.get("monitors", True),
                                                      memo.get("defaults", NO_DEFAULTS), pool_children=True)
            event = _phase_event(outcome)
            if event is not None:   # not kopf.event: this task has no kopf event queue (Kube.post_event)
                kube.post_event(svc, *event)
        except Exception:
            log.exception("periodic resync of %s/%s failed", namespace, name)


def _phase_event(outcome: reconcile.Outcome) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event a phase change is announced by; None when unchanged."""
    if outcome.phase != outcome.old_phase and outcome.phase:
        return "Warning" if outcome.phase == "Degraded" else "Normal", outcome.phase, outcome.message or outcome.phase
    return None


def _announce(body: kopf.Body, outcome: reconcile.Outcome) -> None:
    event = _phase_event(outcome)
    if event is not None:
        kopf.event(body, type=event[0], reason=event[1], message=event[2])


@contextlib.contextmanager
def conflicts_retry_soon() -> Iterator[None]:
    """A write that lost to a concurrent one twice (409, after the status fence's one recompute) is
    retried in a second, not after kopf's default minute: a create handler that failed is still
    "creating" for kopf, and an edit made in that window reaches no update handler until it runs."""
    try:
        yield
    except KubeError as err:
        if err.status != 409:
            raise
        raise kopf.TemporaryError(f"a concurrent write won ({err}); retrying", delay=1) from err


@kopf.on.resume(GROUP, VERSION, "llmservices", id="llmservice-resume")
@kopf.on.create(GROUP, VERSION, "llmservices", id="llmservice-create")
@kopf.on.update(GROUP, VERSION, "llmservices", id="llmservice-update")
def llmservice_apply(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Reconcile the whole LLMService and announce a phase change: what resuming, creating and
    updating one all do (three handlers with their own ids, so kopf keeps their progress apart)."""
    with measured("LLMService"), conflicts_retry_soon():
        outcome = reconcile.reconcile_service(memo.kube, dict(body), memo.get("image"), memo.get("monitors", True),
                                              memo.get("defaults", NO_DEFAULTS))
    _announce(body, outcome)


# Registered after `llmservice_apply`'s update handler, so in the one cycle of kopf's `all_at_once` lifecycle
# (`cli.py`) they run after the reconcile has created a pool that a mode switch adds.
@kopf.on.update(GROUP, VERSION, "llmservices", field="spec.prefill.replicas", param="prefill",
                id="prefill-replicas")
@kopf.on.update(GROUP, VERSION, "llmservices", field="spec.decode.replicas", param="decode",
                id="decode-replicas")
def llmservice_replicas(body: kopf.Body, memo: kopf.Memo, param: Any = None, **_: Any) -> None:
    """kopf calls this only when an update changed `spec.<param>.replicas` (or added the block that
    holds it): pass that edit on to the pool, and nothing else, so a resync or another spec edit never
    undoes a kubectl scale or the autoscaler."""
    with conflicts_retry_soon():
        reconcile.propagate_replicas(memo.kube, dict(body), {str(param)})


@kopf.on.event(GROUP, VERSION, "workerpools")
def workerpool_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A pool appeared, changed or went. Its children are applied when it is new (or first seen by
    this process) or its spec moved past what was reconciled; a status-only change (the echo of our
    own status write) only refreshes the service's status."""
    meta = body["metadata"]
    spec_moved = (body.get("status") or {}).get("observedGeneration") != meta.get("generation")
    if type != "DELETED" and (type != "MODIFIED" or spec_moved):
        with measured("WorkerPool"):
            reconcile.reconcile_pool(memo.kube, dict(body), memo.get("defaults", NO_DEFAULTS), memo.get("image"))
    service = body.get("spec", {}).get("service")
    if service and type == "DELETED":  # recreated by a full reconcile
        outcome = reconcile.reconcile_service_named(memo.kube, meta["namespace"], service, memo.get("image"),
                                                    monitors=memo.get("monitors", True),
                                                    defaults=memo.get("defaults", NO_DEFAULTS))
        _announce_named(memo, meta["namespace"], service, outcome)
    elif service:  # only the counts changed
        _refresh_service_later(memo, meta["namespace"], service)


def _announce_named(memo: kopf.Memo, namespace: str, service: str, outcome: reconcile.Outcome | None) -> None:
    if outcome is not None and outcome.phase != outcome.old_phase:
        svc = memo.kube.get("LLMService", namespace, service)
        if svc is not None:
            _announce(kopf.Body(cast(Any, svc)), outcome)


def _refresh_service_later(memo: kopf.Memo, namespace: str, service: str) -> None:
    def refresh() -> None:
        outcome = reconcile.reconcile_service_named(memo.kube, namespace, service, full=False)
        _announce_named(memo, namespace, service, outcome)

    memo.coalescer.submit(("LLMService", namespace, service), refresh)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED)
def child_event(type: str | None, body: kopf.Body, resource: kopf.Resource, memo: kopf.Memo, **_: Any) -> None:
    """A managed child changed or vanished (RayServices: `_poll_rayservices`)."""
    _child_changed(memo, type, dict(body["metadata"]), status_matters=resource.plural == "deployments")


def _child_changed(memo: kopf.Memo, type: str | None, meta: dict[str, Any], status_matters: bool) -> None:
    """Deleted, or edited by someone else: reconcile its owner, which recreates it or reverts the
    edit. A child whose status the owner reports (a Deployment, a RayService) otherwise changed:
    refresh the owner's status only. Anything else is the echo of the operator's own apply and
    needs nothing; most events are those, and reconciling on each made a burst of creates several
    times slower."""
    labels = meta.get("labels", {})
    answered: reconcile.Answered = memo.answered
    rewrite = type == "DELETED" or answered.new(meta)
    if not rewrite and not status_matters:
        return
    namespace, pool, service = meta["namespace"], labels.get(names.LABEL_POOL), labels.get(names.LABEL_SERVICE)
    if pool and rewrite:
        reconcile.reconcile_pool_named(memo.kube, namespace, pool,
                                       defaults=memo.get("defaults", NO_DEFAULTS), image=memo.get("image"))
    elif pool:
        memo.coalescer.submit(("WorkerPool", namespace, pool),
                              lambda: reconcile.reconcile_pool_named(memo.kube, namespace, pool, status_only=True))
    elif service and rewrite:
        reconcile.reconcile_service_named(memo.kube, namespace, service, memo.get("image"),
                                          monitors=memo.get("monitors", True),
                                          defaults=memo.get("defaults", NO_DEFAULTS))
    elif service:
        _refresh_service_later(memo, namespace, service)
    if rewrite and type != "DELETED":
        answered.answered(meta)
