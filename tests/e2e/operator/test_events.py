"""`Kube.post_event`, the way the periodic resync announces a phase change (kopf can post Events only
from its handlers' tasks): the real apiserver accepts the Event and lists it against its object."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from kvpilot.kubeconfig import load_client
from kvpilot.operator.kube import Kube
from kvpilot.operator.render import MANAGER
from kvpilot.testing.k8s import ControlPlane


def test_an_event_posted_outside_kopf_lands_on_its_object(crds: ControlPlane, namespace: str,
                                                           kget: Callable[..., Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert crds.kubectl("create", "configmap", "announced", "-n", namespace).returncode == 0
    involved = kget("configmap", "announced")
    monkeypatch.setenv("KUBECONFIG", str(crds.kubeconfig))
    Kube(load_client()).post_event(involved, "Warning", "Degraded", "router 0/2 ready")
    out = crds.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=announced",
                       "-o", "json")
    assert out.returncode == 0, out.stderr
    [event] = json.loads(out.stdout)["items"]
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "Degraded", "router 0/2 ready")
    assert event["involvedObject"]["uid"] == involved["metadata"]["uid"]
    assert event["involvedObject"]["kind"] == "ConfigMap" and event["source"]["component"] == MANAGER
