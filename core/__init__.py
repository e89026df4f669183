"""kvpilot: a Kubernetes-native control plane for LLM inference on GPU clusters.

The `kvpilot` namespace holds shared types (this folder, `core/`); the components live in
sub-packages mapped from top-level folders: `kvpilot.operator`, `kvpilot.router`,
`kvpilot.autoscaler`, `kvpilot.kvtransfer`, `kvpilot.sim`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvpilot")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
