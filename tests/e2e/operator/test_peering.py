"""Several operator replicas: kopf peering lets only the highest priority one act; another takes over when it dies."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvpilot.procs import wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane

PEERING_CRDS = REPO_ROOT / "helm" / "kvpilot" / "crds" / "kopf-peering.yaml"
Get = Callable[..., Any]
Operator = Any  # conftest.Operator: start(), stop(), kill(), log(), log_tail()


def _service(name: str) -> str:
    return json.dumps({"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": name},
                       "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
                                "engine": {"type": "simulator", "profile": "h100-qwen2.5-0.5b"},
                                "mode": "aggregated", "decode": {"replicas": 1, "gpus": 1}}})


def _ready(get: Get, name: str) -> bool:
    svc = get("llmservice", name)
    return bool(svc) and any(c["type"] == "Ready" and c["status"] == "True"
                             for c in (svc.get("status") or {}).get("conditions", []))


def _handled(op: Operator, namespace: str, name: str) -> bool:
    """Whether this replica ran any kopf handler for that object (kopf prefixes object logs with [ns/name])."""
    return re.search(rf"\[{re.escape(namespace)}/{re.escape(name)}\] Handler '", op.log()) is not None


def _active(op: Operator) -> bool:
    """kopf starts every replica paused until it has read the peering object, and logs each later
    switch: a replica acts when its last word on it was resuming."""
    log = op.log()
    return log.rfind("Resuming operations after the pause") > log.rfind("Pausing operations")


@pytest.fixture
def peering(crds: ControlPlane, operator: Operator) -> Iterator[str]:
    """A ClusterKopfPeering of our own, with the session's standalone operator stopped meanwhile
    (it would reconcile everything itself, whatever the peers decide)."""
    out = crds.kubectl("apply", "-f", str(PEERING_CRDS))
    assert out.returncode == 0, out.stderr
    crds.kubectl("wait", "--for=condition=Established", "--timeout=30s", "crd/clusterkopfpeerings.kopf.dev")
    name = f"peering-{uuid.uuid4().hex[:6]}"
    doc = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
    assert crds.kubectl("apply", "-f", "-", input=json.dumps(doc)).returncode == 0
    operator.stop()
    try:
        yield name
    finally:
        operator.start()
        crds.kubectl("delete", "clusterkopfpeering", name, "--wait=false")


def test_only_the_highest_priority_replica_acts_and_a_standby_takes_over(
        crds: ControlPlane, peering: str, namespace: str, kget: Get, make_operator: Callable[..., Operator]) -> None:
    common = ("--peering", peering, "--peering-lifetime", "10", "--resync-seconds", "3")
    first = make_operator(*common, "--priority", "200", name="replica-high")
    second = make_operator(*common, "--priority", "100", name="replica-low")
    first.start()
    second.start()

    def both_announced() -> bool:
        out = crds.kubectl("get", "clusterkopfpeering", peering, "-o", "json")
        status = json.loads(out.stdout).get("status") or {}
        return sorted(p["priority"] for p in status.values()) == [100, 200]

    wait_for(both_announced, 30, "both replicas in the peering object")
    wait_for(lambda: _active(first) and not _active(second), 30, "one active replica and one standing by")

    assert crds.kubectl("apply", "-n", namespace, "-f", "-", input=_service("first")).returncode == 0
    wait_for(lambda: _ready(kget, "first"), 90, f"Ready, reconciled by the active replica\n{first.log_tail()}")
    assert _handled(first, namespace, "first"), first.log_tail()
    assert not _handled(second, namespace, "first"), second.log_tail()
    assert _active(first) and not _active(second)
    # The periodic resync is the operator's own task, not kopf's: it must stand by too.
    wait_for(lambda: "standing by for" in second.log() and "periodic resync of" in first.log(), 30,
             f"a resync round on each replica\n{second.log_tail()}")
    assert "periodic resync of" not in second.log()

    # The active replica dies without telling its peers: once its peering entry expires the
    # standby resumes and reconciles what is created from then on.
    first.kill()
    assert crds.kubectl("apply", "-n", namespace, "-f", "-", input=_service("second")).returncode == 0
    wait_for(lambda: _ready(kget, "second"), 90, f"Ready, reconciled by the standby\n{second.log_tail()}")
    assert _active(second)
    wait_for(lambda: "periodic resync of" in second.log(), 30, "the new active replica to resync")
    assert _handled(second, namespace, "second")
    assert kget("deployment", "second-worker") is not None and kget("deployment", "second-router") is not None
