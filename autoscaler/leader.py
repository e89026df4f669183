"""Leader election over a coordination.k8s.io Lease, so that autoscaler replicas can run two
at a time and only one acts.

Two writers of a WorkerPool's scale subresource undo each other; a standby that waits for the
lease to lapse takes over within one lease duration of the leader going away. The rule is the
one client-go's leaderelection uses: hold while you renew; take over a lease whose holder has
not renewed for its duration; every write carries the resourceVersion read, so of two
candidates racing for a lapsed lease the API server lets exactly one through (409 for the other).
The decision is a pure function (`next_lease`); `LeaseElector` is its thin shell.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("kvpilot.autoscaler")


@dataclass(slots=True, frozen=True)
class LeaseView:
    holder: str | None
    renewed: dt.datetime | None
    duration_s: int
    transitions: int = 0
    acquired: dt.datetime | None = None


def next_lease(current: LeaseView | None, me: str, now: dt.datetime, duration_s: int) -> LeaseView | None:
    """The lease `me` should write now, or None when someone else holds it and has renewed
    within its duration (then `me` stands by)."""
    if current is None:
        return LeaseView(me, now, duration_s, 0, now)
    if current.holder == me:
        return replace(current, renewed=now, duration_s=duration_s)
    lapsed = current.renewed is None or (now - current.renewed).total_seconds() > current.duration_s
    if current.holder and not lapsed:
        return None
    return LeaseView(me, now, duration_s, current.transitions + 1, now)


def _micro(t: dt.datetime | None) -> str | None:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if t is not None else None


class LeaseElector:
    """`acquire()` once per loop, more often than the lease's duration: True while this replica
    holds the lease."""

    def __init__(self, api: Any, namespace: str, name: str, identity: str, duration_s: int = 15) -> None:
        from kubernetes import client

        self.coord: Any = client.CoordinationV1Api(api)   # dict bodies, like the rest of the shell
        self.namespace, self.name, self.identity, self.duration_s = namespace, name, identity, duration_s
        self.leading = False

    def _body(self, lease: LeaseView, resource_version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            meta["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
                "spec": {"holderIdentity": lease.holder, "leaseDurationSeconds": lease.duration_s,
                         "renewTime": _micro(lease.renewed), "acquireTime": _micro(lease.acquired),
                         "leaseTransitions": lease.transitions}}

    def acquire(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        now = dt.datetime.now(dt.UTC)
        try:
            obj = self.coord.read_namespaced_lease(self.name, self.namespace)
            spec = obj.spec
            current: LeaseView | None = LeaseView(spec.holder_identity, spec.renew_time,
                                                  spec.lease_duration_seconds or self.duration_s,
                                                  spec.lease_transitions or 0, spec.acquire_time)
            version: str | None = obj.metadata.resource_version
        except ApiException as err:
            if err.status != 404:
                raise
            current, version = None, None
        want = next_lease(current, self.identity, now, self.duration_s)
        held = False
        if want is not None:
            try:
                if version is None:
                    self.coord.create_namespaced_lease(self.namespace, self._body(want, None))
                else:
                    self.coord.replace_namespaced_lease(self.name, self.namespace, self._body(want, version))
                held = True
            except ApiException as err:
                if err.status not in (409, 422):   # 409: another candidate wrote first
                    raise
        if held != self.leading:
            log.info("leader election: %s the lease %s/%s", "acquired" if held else "lost",
                     self.namespace, self.name, extra={"identity": self.identity})
        self.leading = held
        return held
