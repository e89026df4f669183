"""Pods by hand on an api-only control plane (`ControlPlane("api")`, no kubelet), for tests of
what discovers endpoints as ready pods: the test creates the pods in a namespace of its own and
plays the kubelet's part, writing each pod's IP and readiness, while the "pods" themselves are
processes it started on loopback IPs."""

from __future__ import annotations

import uuid
from typing import Any, cast

from kubernetes import client, config

from kvpilot.testing.k8s import ControlPlane


class HandPods:
    def __init__(self, plane: ControlPlane, prefix: str) -> None:
        self.ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))  # type: ignore[no-untyped-call]
        # Plain dicts for bodies, as kubectl's YAML would be: the client takes them as they are.
        self.core: Any = cast(Any, client.CoreV1Api(api))
        self.core.create_namespace({"metadata": {"name": self.ns}})

    def add(self, name: str, labels: dict[str, str], ip: str) -> None:
        """A pod `name` with `labels`, running and ready at `ip`."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                                "spec": {"containers": [{"name": "engine", "image": "kvpilot/sim:test"}]}}
        self.core.create_namespaced_pod(self.ns, body)
        self.set_ready(name, ip, True)

    def set_ready(self, name: str, ip: str, ready: bool) -> None:
        """Write the status a kubelet would: running at `ip`, its Ready condition `ready`."""
        status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                  "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
        self.core.patch_namespaced_pod_status(name, self.ns, {"status": status})

    def delete(self, name: str, **options: Any) -> None:
        self.core.delete_namespaced_pod(name, self.ns, **options)

    def close(self) -> None:
        """Delete the namespace and every pod in it."""
        self.core.delete_namespace(self.ns)
