"""The container image from scripts/build-image.sh, run the way a kubelet runs it: unpacked from its
OCI layout into a runtime bundle (umoci) and started by runc, as uid 65532 on a read-only root
filesystem, with the image's own entrypoint.

Builds the image when its cache is cold (minutes: Debian packages and the wheels); a warm cache
(`make test` builds it first) makes this a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvpilot import __version__
from kvpilot.testing.k8s import REPO_ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runc and mmdebstrap's root mode need root")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's OCI layout, from the archive the build script prints (built or cached)."""
    archive = os.environ.get("KVPILOT_IMAGE_ARCHIVE")
    if not archive:
        out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build-image.sh")], cwd=REPO_ROOT, check=True,
                             stdout=subprocess.PIPE, text=True, timeout=3600)
        archive = out.stdout.strip().splitlines()[-1]
    path = tmp_path_factory.mktemp("oci") / "layout"
    with tarfile.open(archive) as tar:
        tar.extractall(path, filter="tar")
    return path


def _blob(layout: Path, digest: str) -> Any:
    algo, hexdigest = digest.split(":")
    return json.loads((layout / "blobs" / algo / hexdigest).read_text())


@pytest.fixture(scope="module")
def bundle(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("bundle") / "kvpilot"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:kvpilot", str(path)], check=True,
                   capture_output=True, timeout=600)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(bundle: Path, args: list[str] | None, tmp: Path) -> subprocess.CompletedProcess[str]:
    """runc run with the bundle's config (the image's entrypoint, user, env), a read-only root and
    a tmpfs /tmp as the chart gives its pods; `args` replaces the whole command line when set."""
    config = json.loads((bundle / "config.json").read_text())
    config["root"]["readonly"] = True
    config["process"]["terminal"] = False
    if args is not None:
        config["process"]["args"] = args
    config["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                             "options": ["nosuid", "nodev", "mode=1777", "size=16m"]})
    (bundle / "config.json").write_text(json.dumps(config))
    state = tmp / "runc-state"
    name = f"kvpilot-test-{uuid.uuid4().hex[:8]}"
    try:
        return subprocess.run(["runc", "--root", str(state), "run", "--bundle", str(bundle), name],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", name], capture_output=True, timeout=30)


def test_image_config_names_the_entrypoint_and_a_non_root_user(layout: Path) -> None:
    index = json.loads((layout / "index.json").read_text())
    [manifest_ref] = index["manifests"]
    assert manifest_ref["annotations"]["io.containerd.image.name"] == f"ghcr.io/kvpilot/kvpilot:{__version__}"
    manifest = _blob(layout, manifest_ref["digest"])
    config = _blob(layout, manifest["config"]["digest"])["config"]
    assert config["Entrypoint"] == ["kvpilot"] and config["User"] == "65532:65532"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/kvpilot/bin:") and env["HOME"] == "/tmp"
    assert len(manifest["layers"]) == 2   # Debian, then the venv: a code change replaces only the second


def test_the_entrypoint_runs_as_65532_on_a_read_only_root(bundle: Path, tmp_path: Path) -> None:
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"] == ["kvpilot", "--help"]    # ENTRYPOINT + CMD
    assert (config["process"]["user"]["uid"], config["process"]["user"]["gid"]) == (65532, 65532)
    out = _run(bundle, None, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "usage: kvpilot" in out.stdout
    for command in ("operator", "router", "autoscaler", "sim"):
        assert command in out.stdout
    # Each component's own parser loads (imports every dependency it needs) under the same limits.
    probe = ("import os, pathlib, kvpilot.operator.handlers, kvpilot.router.proxy, kvpilot.router.discovery, "
             "kvpilot.sim.server, kvpilot.autoscaler.cli; "
             "print(os.getuid(), os.getgid()); "
             "pathlib.Path('/tmp/ok').write_text('x'); "
             "open('/opt/kvpilot/x', 'w')")
    out = _run(bundle, ["python", "-c", probe], tmp_path)
    assert out.stdout.split() == ["65532", "65532"], out.stderr
    assert out.returncode == 1 and "Read-only file system" in out.stderr, out.stderr
