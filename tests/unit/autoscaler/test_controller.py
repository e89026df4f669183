"""The autoscaler's shell: knobs from the LLMService, pod deletion costs, the process kubelet's argv."""

from __future__ import annotations

import pytest

from kvpilot.autoscaler.actuators import PoolRef, PoolState, deletion_costs, hpa_conflict
from kvpilot.autoscaler.controller import Autoscaler, planner_config
from kvpilot.autoscaler.planner import PlannerConfig
from kvpilot.crds import API_VERSION, LLMServiceSpec
from kvpilot.testing.kubelet import worker_argv


def spec(**extra: object) -> LLMServiceSpec:
    return LLMServiceSpec.model_validate({
        "model": {"name": "m"}, "mode": "disaggregated",
        "prefill": {"replicas": 2, "minReplicas": 1, "maxReplicas": 6},
        "slo": {"ttftMs": 1500, "tpotMs": 50, "attainment": 0.95},
        "autoscaling": {"enabled": True, "scaleDownStabilizationSeconds": 120}, **extra})


def test_planner_config_comes_from_the_service() -> None:
    s = spec()
    cfg = planner_config(s, s.pools()["prefill"], PlannerConfig(max_replicas=16))
    assert (cfg.ttft_slo_s, cfg.tpot_slo_s, cfg.attainment_target) == (1.5, 0.05, 0.95)
    assert (cfg.min_replicas, cfg.max_replicas, cfg.scale_down_window_s) == (1, 6, 120.0)
    decode = planner_config(s, s.pools()["decode"], PlannerConfig(max_replicas=16))
    assert decode.max_replicas == 16  # no bound in the pool: the autoscaler's default


def test_deletion_cost_ranks_idle_and_broken_pods_first() -> None:
    busy = "vllm:num_requests_running 12\nvllm:kv_cache_usage_perc 0.5\n"
    idle_warm = "vllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.9\n"
    idle_cold = "vllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.1\n"
    costs = deletion_costs({"busy": busy, "warm": idle_warm, "cold": idle_cold, "broken": None})
    assert sorted(costs, key=costs.__getitem__) == ["broken", "cold", "warm", "busy"]


class FakeActuator:
    def __init__(self, state: PoolState | None) -> None:
        self.state = state
        self.scaled: list[tuple[PoolRef, int]] = []

    def observe(self, pool: PoolRef) -> PoolState | None:
        return self.state

    def scale(self, pool: PoolRef, replicas: int) -> None:
        self.scaled.append((pool, replicas))


def test_services_without_autoscaling_or_pools_are_left_alone() -> None:
    act = FakeActuator(PoolState(2, 2, []))
    scaler = Autoscaler(act, clock=lambda: 0.0)
    off = spec(autoscaling={"enabled": False}).model_dump(by_alias=True)
    assert scaler.tick([("ns", "off", off)]) == []
    ray = spec(engine={"type": "ray-serve"}).model_dump(by_alias=True)   # Ray Serve's autoscaler sizes it
    assert scaler.tick([("ns", "ray", ray)]) == []
    decisions = scaler.tick([("ns", "on", spec().model_dump(by_alias=True))])
    # No ready replica to read metrics from: hold at the asked size, never scale on silence.
    assert {d.pool.role for d in decisions} == {"prefill", "decode"}
    assert all(d.desired == 2 and "holding" in d.reason for d in decisions) and act.scaled == []
    act.state = None  # the operator has not made the pools yet
    assert scaler.tick([("ns", "on", spec().model_dump(by_alias=True))]) == []


def test_worker_argv_binds_the_pods_own_command_to_its_ip() -> None:
    container = {"command": ["kvpilot"],
                 "args": ["sim", "serve", "--model", "m", "--host", "0.0.0.0", "--port", "8000"]}
    argv = worker_argv(container, "127.64.0.7")
    assert argv[-6:] == ["--model", "m", "--host", "127.64.0.7", "--port", "8000"]
    with pytest.raises(ValueError):
        worker_argv({"command": ["vllm", "serve", "x"]}, "127.64.0.7")


def test_a_pool_an_hpa_also_scales_is_left_alone_and_the_status_says_why() -> None:
    ref = PoolRef("ns", "svc", "decode", "svc-decode")
    targets: list[tuple[str, str | None, str, str]] = [
        ("web", "apps/v1", "Deployment", "svc-decode"),                  # another kind: not ours
        ("other", API_VERSION, "WorkerPool", "svc-prefill"),             # another pool
        ("mine", API_VERSION, "WorkerPool", "svc-decode")]
    why = hpa_conflict(ref, targets)
    assert why.startswith("refusing to scale") and "mine" in why and "other" not in why and "web" not in why
    assert hpa_conflict(ref, targets[:2]) == ""
    act = FakeActuator(PoolState(3, 3, ["http://127.0.0.1:9"], (), 0, why))
    decisions = Autoscaler(act, clock=lambda: 0.0).tick([("ns", "svc", spec().model_dump(by_alias=True))])
    assert decisions and all(d.desired == 3 and d.reason == why for d in decisions)
    assert act.scaled == []


def test_with_a_prometheus_url_the_signals_come_from_promql_not_the_pods() -> None:
    """No pod to scrape, and a Prometheus that does not answer (nothing listens on port 9): the
    scraping path says there is no replica to read; the PromQL path asks Prometheus, gets no
    series, and holds on missing metrics. Neither scales on silence."""
    act = FakeActuator(PoolState(2, 2, []))
    scraped = Autoscaler(act, clock=lambda: 0.0).tick([("ns", "svc", spec().model_dump(by_alias=True))])
    assert all("no ready replica" in d.reason for d in scraped)
    promql = Autoscaler(act, clock=lambda: 0.0, prometheus_url="http://127.0.0.1:9")
    decisions = promql.tick([("ns", "svc", spec().model_dump(by_alias=True))])
    assert decisions and all(d.desired == 2 and "missing" in d.reason for d in decisions)
    assert act.scaled == []
