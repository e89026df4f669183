"""The wake signal over real HTTP: the autoscaler reads the requests a router holds for a pool at
zero from the router's /metrics, wakes that pool, and wakes the service's other pool at zero with
it even when the router counted only one (a P/D request needs both)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kvpilot.autoscaler.actuators import PoolRef, PoolState
from kvpilot.autoscaler.controller import Autoscaler
from kvpilot.crds import LLMServiceSpec
from kvpilot.names import COLD_HELD
from kvpilot.procs import free_port

SPEC = LLMServiceSpec.model_validate({
    "model": {"name": "m"}, "mode": "disaggregated",
    "prefill": {"replicas": 0, "minReplicas": 0, "maxReplicas": 4},
    "decode": {"replicas": 0, "minReplicas": 0, "maxReplicas": 4},
    "autoscaling": {"enabled": True}}).model_dump(by_alias=True)


@pytest.fixture
def router() -> Iterator[tuple[str, Gauge]]:
    """A stand-in for the router's /metrics: the same gauge name and labels, served over HTTP."""
    registry = CollectorRegistry()
    gauge = Gauge(COLD_HELD, "held", ["model", "role"], registry=registry)
    port = free_port()
    server, thread = start_http_server(port, "127.0.0.1", registry)
    yield f"http://127.0.0.1:{port}", gauge
    server.shutdown()
    thread.join(timeout=5)


class AtZero:
    def __init__(self, router_url: str) -> None:
        self.router_url = router_url
        self.scaled: dict[str, int] = {}

    def observe(self, pool: PoolRef) -> PoolState | None:
        return PoolState(self.scaled.get(pool.role, 0), 0, [], (self.router_url,))

    def scale(self, pool: PoolRef, replicas: int) -> None:
        self.scaled[pool.role] = replicas


def test_a_held_request_wakes_its_pool_and_the_other_pool_with_it(router: tuple[str, Gauge]) -> None:
    url, gauge = router
    act = AtZero(url)
    scaler = Autoscaler(act, clock=lambda: 0.0)
    idle = scaler.tick([("ns", "svc", SPEC)])
    assert act.scaled == {} and all(d.desired == 0 and "at zero" in d.reason for d in idle)
    gauge.labels("m", "prefill").set(2)            # the router counted the held requests for prefill only
    woke = {d.pool.role: d for d in scaler.tick([("ns", "svc", SPEC)])}
    assert act.scaled == {"prefill": 1, "decode": 1}
    assert woke["prefill"].reason.startswith("wake from zero: 2 request(s)")
    assert woke["decode"].reason.startswith("wake from zero: with the service's other pool")
