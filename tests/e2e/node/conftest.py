"""The `node` control plane (a real kubelet running real containers) with the kvpilot image imported.

Skips, with the reason, only when not root or with no image archive ($KVPILOT_IMAGE_ARCHIVE,
which `make test` sets); anything else in the way (no runc, links left by a killed run) fails
with the reason (`kvpilot.testing.node.host_problems`). Tear-down fails the module's last test if
anything of the node is left on the host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpilot.testing.k8s import ControlPlane


@pytest.fixture(scope="module")
def k8s_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    if os.geteuid() != 0:
        pytest.skip("a real node (containerd, runc, kubelet) needs root")
    archive = os.environ.get("KVPILOT_IMAGE_ARCHIVE")
    if not archive or not Path(archive).is_file():
        pytest.skip("no image: set KVPILOT_IMAGE_ARCHIVE to scripts/build-image.sh's archive (make test does)")
    plane = ControlPlane("node", workdir=tmp_path_factory.mktemp("k8s-node"), images=[Path(archive)])
    with plane:
        yield plane
