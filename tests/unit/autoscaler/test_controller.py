"""The autoscaler's shell: knobs from the LLMService, pod deletion costs, the process kubelet's argv."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from kvpilot.autoscaler.actuators import PoolRef, PoolState, deletion_costs, hpa_conflict
from kvpilot.autoscaler.cli import _write_status
from kvpilot.autoscaler.controller import NO_PROMETHEUS, Autoscaler, Decision, planner_config, reason_kind
from kvpilot.autoscaler.planner import PlannerConfig
from kvpilot.autoscaler.signals import PromSignals
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


def test_metrics_source_picks_promql_or_the_pods_per_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each service's `spec.autoscaling.metricsSource` picks its signal reader, whatever the other
    services use: pods are scraped (here none answers: "no ready replica"); prometheus is asked by
    PromQL for the pool's own pods, and its answers drive the plan; the source is in the decision
    (and so in status). Without a Prometheus to ask, such a service is held and says why."""
    asked: list[str] = []

    def query(self: PromSignals, promql: str) -> float | None:
        asked.append(promql)
        return 0.0 if "quantile" not in promql else 0.05   # an idle pool within its SLO

    monkeypatch.setattr(PromSignals, "query", query)
    act = FakeActuator(PoolState(2, 2, []))
    scaler = Autoscaler(act, clock=lambda: 0.0, prometheus_url="http://127.0.0.1:9")
    pods = spec(autoscaling={"enabled": True}).model_dump(by_alias=True)
    prom = spec(autoscaling={"enabled": True, "metricsSource": "prometheus"}).model_dump(by_alias=True)
    decisions = scaler.tick([("ns", "scraped", pods)])
    assert decisions and all(d.metrics_source == "pods" and "no ready replica" in d.reason for d in decisions)
    assert asked == []
    decisions = scaler.tick([("ns", "svc", prom)])
    assert decisions and all(d.metrics_source == "prometheus" for d in decisions)
    assert all("no ready replica" not in d.reason for d in decisions)
    assert any('namespace="ns",pod=~"svc-decode-.*"' in q for q in asked)
    assert any('namespace="ns",pod=~"svc-prefill-.*"' in q for q in asked)
    assert not any("scraped" in q for q in asked)
    unset = Autoscaler(act, clock=lambda: 0.0).tick([("ns", "svc", prom)])
    assert unset and all(d.desired == 2 and NO_PROMETHEUS in d.reason for d in unset)
    assert {reason_kind(d.reason) for d in unset} == {"no_metrics"}
    assert act.scaled == []


def test_status_says_which_metrics_source_a_decision_read() -> None:
    patched: list[dict[str, Any]] = []

    class Custom:
        def patch_namespaced_custom_object_status(self, *args: Any) -> None:
            patched.append(args[-1])

    ref = PoolRef("ns", "svc", "decode", "svc-decode")
    d = Decision(ref, 2, 2, 2, "steady", 0.0, "prometheus")
    written: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    _write_status(Custom(), [d], written)
    assert patched[-1]["status"]["autoscaling"]["decode"]["metricsSource"] == "prometheus"
    _write_status(Custom(), [d], written)
    assert len(patched) == 1                       # unchanged: not rewritten
    _write_status(Custom(), [replace(d, metrics_source="pods")], written)
    assert len(patched) == 2 and patched[-1]["status"]["autoscaling"]["decode"]["metricsSource"] == "pods"


def test_metrics_source_is_pods_or_prometheus() -> None:
    assert spec().autoscaling.metrics_source == "pods"
    with pytest.raises(ValidationError):
        spec(autoscaling={"enabled": True, "metricsSource": "graphite"})
