"""The operator as a real process against the session's full control plane, with the CRDs applied."""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvpilot.procs import ManagedProcess, wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane


class Operator:
    """`kvpilot operator run` (by default --standalone), restartable, logging to the control plane's log folder."""

    def __init__(self, plane: ControlPlane, args: tuple[str, ...] = ("--standalone",), name: str = "operator") -> None:
        self.plane = plane
        self.args = args
        self.name = name
        self.proc: ManagedProcess | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        argv = [sys.executable, "-P", "-m", "kvpilot.cli", "operator", "run", "--resync-seconds", "20", *self.args]
        self.proc = ManagedProcess(f"kvpilot-{self.name}", argv,
                                   self.plane.dir / "logs" / f"{self.name}-{self.starts}.log",
                                   env=self.plane.env(), cwd=REPO_ROOT)
        proc = self.proc
        wait_for(lambda: "Initial authentication has finished" in proc.log_path.read_text(), 30,
                 "the operator to log in", proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run, so the process cannot say goodbye to its peers."""
        proc = self.proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)
        wait_for(lambda: not proc.alive(), 10, "the operator to die")

    def log_tail(self) -> str:
        return self.proc.log_tail(60) if self.proc else ""

    def log(self) -> str:
        """Everything this run logged so far."""
        return self.proc.log_path.read_text() if self.proc else ""


def apply_crds(plane: ControlPlane) -> ControlPlane:
    """kvpilot's CRDs on `plane`, established."""
    out = plane.kubectl("apply", "-f", str(REPO_ROOT / "deploy" / "crds"))
    assert out.returncode == 0, out.stderr
    out = plane.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                        "crd/llmservices.kvpilot.io", "crd/workerpools.kvpilot.io")
    assert out.returncode == 0, out.stderr
    return plane


def _plane_with_crds(tmp_path_factory: pytest.TempPathFactory, name: str, gpus: int,
                     nodes: int) -> Iterator[ControlPlane]:
    plane = ControlPlane("full", workdir=Path(tmp_path_factory.mktemp(f"k8s-{name}")))
    with plane:
        plane.add_gpu_nodes(nodes, gpus=gpus, prefix=f"{name}-node")
        yield apply_crds(plane)


def _operator_on(plane: ControlPlane) -> Iterator[Operator]:
    op = Operator(plane)
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture(scope="module")
def own_crds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A full control plane of the requesting module's own (two kwok nodes of 8 GPUs), with the
    CRDs applied: for modules that crash or flood the plane, so that later modules on the
    session's plane never see the aftermath. The modules in `own_plane/` get it as their `crds`."""
    yield from _plane_with_crds(tmp_path_factory, "own", gpus=8, nodes=2)


@pytest.fixture(scope="module")
def cpu_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A full plane with one CPU node (routers run there) and no GPU node, with the CRDs applied."""
    yield from _plane_with_crds(tmp_path_factory, "cpu-only", gpus=0, nodes=1)


@pytest.fixture(scope="module")
def own_operator(own_crds: ControlPlane) -> Iterator[Operator]:
    yield from _operator_on(own_crds)


@pytest.fixture(scope="session")
def crds(k8s_full: ControlPlane) -> ControlPlane:
    return apply_crds(k8s_full)


@pytest.fixture(scope="session")
def operator(crds: ControlPlane) -> Iterator[Operator]:
    yield from _operator_on(crds)


@pytest.fixture
def make_operator(crds: ControlPlane) -> Iterator[Callable[..., Operator]]:
    """Extra operator processes with given arguments, all stopped after the test."""
    made: list[Operator] = []

    def make(*args: str, name: str) -> Operator:
        op = Operator(crds, args, name)
        made.append(op)
        return op

    yield make
    for op in made:
        op.stop()


@pytest.fixture
def namespace(crds: ControlPlane) -> Iterator[str]:
    name = f"op-{uuid.uuid4().hex[:8]}"
    assert crds.kubectl("create", "namespace", name).returncode == 0
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def kget(crds: ControlPlane, namespace: str) -> Callable[..., Any]:
    """kubectl get … -o json in the test's namespace; None when the object does not exist."""

    def get(*args: str) -> Any:
        out = crds.kubectl("get", "-n", namespace, *args, "-o", "json")
        if out.returncode != 0:
            if "NotFound" in out.stderr:
                return None
            raise RuntimeError(out.stderr)
        return json.loads(out.stdout)

    return get



@pytest.fixture
def operator_on() -> Iterator[Callable[..., Operator]]:
    """Operators against another control plane than the session's (a test that needs its own
    cluster shape), all stopped after the test."""
    made: list[Operator] = []

    def start(plane: ControlPlane, *args: str) -> Operator:
        op = Operator(plane, args or ("--standalone",), name=f"operator-{len(made)}")
        made.append(op)
        op.start()
        return op

    yield start
    for op in made:
        op.stop()
