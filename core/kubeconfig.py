"""How every kvpilot process finds its Kubernetes API, in one place so the operator, the router's
pod discovery and the autoscaler agree: $KUBECONFIG when set (also inside a pod, so a test or a
sidecar can point a process elsewhere), else the pod's service account, else ~/.kube/config."""

from __future__ import annotations

import os

from kubernetes import client, config


def load_client(connections: int = 32) -> client.ApiClient:
    """An API client with a pool of `connections`: one per thread that calls it, or threads open
    (and TLS-handshake) throwaway connections under load."""
    cfg = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),  # type: ignore[no-untyped-call]
                                client_configuration=cfg)
    cfg.connection_pool_maxsize = connections
    return client.ApiClient(cfg)
