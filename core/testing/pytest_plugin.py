"""pytest fixtures for real infrastructure. Enabled by `tests/conftest.py`.

Session-scoped where start-up is slow (control planes, Redis); every fixture stops what it
started, and `kvpilot.procs` kills stragglers at exit.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from kvpilot.testing.k8s import ControlPlane
from kvpilot.testing.prometheus import PrometheusServer
from kvpilot.testing.redis import RedisServer
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker


@pytest.fixture(scope="session")
def k8s_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver: CRDs, custom resources, watches, validation."""
    plane = ControlPlane("api", workdir=tmp_path_factory.mktemp("k8s-api"))
    with plane:
        yield plane


@pytest.fixture(scope="session")
def k8s_full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The full plane with two kwok nodes of 8 × nvidia.com/gpu each."""
    plane = ControlPlane("full", workdir=tmp_path_factory.mktemp("k8s-full"))
    with plane:
        plane.add_gpu_nodes(2, gpus=8)
        yield plane


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


class _Stoppable(Protocol):
    def stop(self) -> None: ...


S = TypeVar("S", bound=_Stoppable)


def _stopped_after(make: Callable[..., S]) -> Iterator[Callable[..., S]]:
    """The body of every `*_factory` fixture: yield a starter that calls `make` and keeps what it
    made, then stop all of it after the test, whatever the test did."""
    started: list[S] = []

    def start(*args: Any, **kwargs: Any) -> S:
        made = make(*args, **kwargs)
        started.append(made)
        return made

    try:
        yield start
    finally:
        for made in started:
            made.stop()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Call with the scrape targets (["127.0.0.1:PORT", ...]) to start a Prometheus."""
    n = itertools.count()

    def start(targets: list[str], scrape_interval: str = "1s") -> PrometheusServer:
        return PrometheusServer(targets, scrape_interval=scrape_interval, workdir=tmp_path / f"prom-{next(n)}")

    yield from _stopped_after(start)


@pytest.fixture
def sim_worker_factory(tmp_path: Path) -> Iterator[Callable[..., SimWorker]]:
    """Call with `kvpilot sim serve` flags to start a worker process; all are stopped after the test."""

    def start(*args: str, **kwargs: Any) -> SimWorker:
        return SimWorker(*args, workdir=tmp_path, **kwargs)

    yield from _stopped_after(start)


@pytest.fixture
def router_factory(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Call with the router's `models` list (and settings) to start `kvpilot router`."""

    def start(models: list[dict[str, object]], **settings: object) -> RouterProcess:
        return RouterProcess(models, workdir=tmp_path, **settings)

    yield from _stopped_after(start)
