"""Real infrastructure for tests and local poking: Kubernetes control plane, Redis, Prometheus.

Everything here starts real programs on loopback addresses with free ports and tears them
down again; nothing is mocked. Tests reach it through the pytest plugin in
`kvpilot.testing.pytest_plugin`; a developer can start the control plane by hand with
`scripts/k8s-harness`.
"""
