"""pytest fixtures for real infrastructure. Enabled by `tests/conftest.py`.

Session-scoped where start-up is slow (control planes, Redis); every fixture stops what it
started, and `kvpilot.procs` kills stragglers at exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

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


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Call with the scrape targets (["127.0.0.1:PORT", ...]) to start a Prometheus."""
    started: list[PrometheusServer] = []

    def start(targets: list[str], scrape_interval: str = "1s") -> PrometheusServer:
        server = PrometheusServer(targets, scrape_interval=scrape_interval,
                                  workdir=tmp_path / f"prom-{len(started)}")
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def sim_worker_factory(tmp_path: Path) -> Iterator[Callable[..., SimWorker]]:
    """Call with `kvpilot sim serve` flags to start a worker process; all are stopped after the test."""
    started: list[SimWorker] = []

    def start(*args: str, **kwargs: object) -> SimWorker:
        worker = SimWorker(*args, workdir=tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture
def router_factory(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Call with the router's `models` list (and settings) to start `kvpilot router`."""
    started: list[RouterProcess] = []

    def start(models: list[dict[str, object]], **settings: object) -> RouterProcess:
        router = RouterProcess(models, workdir=tmp_path, **settings)
        started.append(router)
        return router

    try:
        yield start
    finally:
        for router in started:
            router.stop()
