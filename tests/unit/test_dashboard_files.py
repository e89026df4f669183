"""The generated dashboards and rules: checked in up to date, what Grafana's models accept, and the
helpers that turn their PromQL into checks."""

from __future__ import annotations

import json

import pytest
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client import CollectorRegistry

from kvpilot.autoscaler.actuators import PoolRef
from kvpilot.autoscaler.controller import Decision, Metrics, reason_kind, slo_bucket
from kvpilot.autoscaler.planner import PlannerConfig, PoolPlanner, PoolSignals
from kvpilot.crds import LLMServiceSpec
from kvpilot.dashboards.__main__ import generated
from kvpilot.dashboards.boards import ANNOTATION_EXTRAS, BOARDS
from kvpilot.dashboards.queries import (
    DASHBOARDS,
    REPO,
    always_answers,
    dashboard_exprs,
    instantiate,
    load_all,
    metric_names,
)
from kvpilot.dashboards.rules import rule_groups
from kvpilot.generated import stale
from kvpilot.vllm_metrics import ITL_BUCKETS, LATENCY_BUCKETS


def test_checked_in_files_are_generated_from_the_code() -> None:
    assert stale(generated(), REPO) == [], "run: python -P -m kvpilot.dashboards"
    assert sorted(p.stem for p in DASHBOARDS.glob("*.json")) == sorted(BOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_grafana_models_keep_every_field(name: str) -> None:
    """Decoding with the SDK's Dashboard model and encoding again loses nothing: every key is one
    Grafana's schema knows (the annotation's Prometheus-editor keys aside, which the model lacks)."""
    doc = json.loads((DASHBOARDS / f"{name}.json").read_text())
    again = json.loads(json.dumps(Dashboard.from_json(doc).to_json(), default=lambda o: o.to_json()))
    for ann in doc.get("annotations", {}).get("list", []):
        for key in ANNOTATION_EXTRAS.get(ann["name"], {}):
            del ann[key]
    assert again == doc
    ids = [p["id"] for p in doc["panels"] if "id" in p]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"]


def test_every_board_has_panels_and_variables() -> None:
    for name in BOARDS:
        doc = json.loads((DASHBOARDS / f"{name}.json").read_text())
        exprs = list(dashboard_exprs(doc, name))
        assert sum(e.kind == "panel" for e in exprs) >= 6, name
        assert {"datasource", "namespace", "service"} <= {v["name"] for v in doc["templating"]["list"]}


def test_generated_covers_deploy_and_chart() -> None:
    paths = {str(p) for p in generated()}
    assert "deploy/prometheus/rules.yaml" in paths and "helm/kvpilot/files/prometheus-rules.yaml" in paths
    assert {f"helm/kvpilot/files/dashboards/{n}.json" for n in BOARDS} <= paths


def test_queries_helpers() -> None:
    assert always_answers("a > 6 and b >= 0.5") == "a > bool 6 and b >= bool 0.5"
    assert always_answers('x{a!="b"} == bool 1') == 'x{a!="b"} == bool 1'
    assert instantiate('rate(x{s=~"$service"}[$__rate_interval])') == 'rate(x{s=~".*"}[1m])'
    assert metric_names('sum by (kvpilot_io_service) (rate(vllm:prompt_tokens_total{kvpilot_io_role="x"}[1m]))'
                        " / kvpilot:ttft_requests:rate5m * kvpilot_router_inflight") == {
        "vllm:prompt_tokens_total", "kvpilot:ttft_requests:rate5m", "kvpilot_router_inflight"}
    kinds = {e.kind for e in load_all()}
    assert kinds == {"panel", "annotation", "variable", "record", "alert"}


def test_reason_kinds() -> None:
    assert reason_kind("scale up: prefill demand 900 tok/s over 500 tok/s per replica") == "prompt_demand"
    assert reason_kind("scale up (2 still starting): 40 running sequences over 8 per replica") == "decode_demand"
    assert reason_kind("holding: 2 replica(s) still starting") == "starting"
    assert reason_kind("scale up: TTFT p90 3.00s > SLO 2.00s; attainment 50% < 90%") == "ttft_slo"
    assert reason_kind("holding: scale-down stabilising (prefill demand 1 tok/s)") == "stabilising"
    assert reason_kind("holding: metrics missing or stale") == "no_metrics"
    assert reason_kind("something new") == "other"


def test_slo_bucket_is_at_or_below_the_target() -> None:
    assert slo_bucket(2.0, LATENCY_BUCKETS) == "1.0"
    assert slo_bucket(2.5, LATENCY_BUCKETS) == "2.5"
    assert slo_bucket(0.1, ITL_BUCKETS) == "0.1"
    assert slo_bucket(0.06, ITL_BUCKETS) == "0.05"
    assert slo_bucket(0.0001, ITL_BUCKETS) == "0.01"


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_autoscaler_metrics_record_reason_gpu_time_and_forecast() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    spec = LLMServiceSpec.model_validate({"model": {"name": "m"}, "slo": {"ttftMs": 2000, "tpotMs": 100,
                                                                          "attainment": 0.95}})
    m.service("ns", "svc", spec)
    assert _value(registry, "kvpilot_autoscaler_slo_seconds", namespace="ns", service="svc", slo="ttft", le="1.0") == 2
    assert _value(registry, "kvpilot_autoscaler_slo_attainment_target", namespace="ns", service="svc") == 0.95
    planner = PoolPlanner("prefill", PlannerConfig())
    planner.plan(PoolSignals(0.0, 2, 2, 1000.0, 4.0, 0.5, 0.05, 1.0))
    ref = PoolRef("ns", "svc", "prefill", "svc-prefill")
    key = {"namespace": "ns", "service": "svc", "pool": "prefill"}
    m.record(Decision(ref, 2, 2, 2, "steady: prefill demand", 100.0), gpus=2, planner=planner)
    m.record(Decision(ref, 2, 2, 3, "scale up: TTFT p90 3.00s > SLO 2.00s", 130.0), gpus=2, planner=planner)
    assert _value(registry, "kvpilot_autoscaler_gpu_seconds_total", **key) == 2 * 2 * 30
    assert _value(registry, "kvpilot_autoscaler_replicas_started_total", **key) == 1
    assert _value(registry, "kvpilot_autoscaler_decisions_total", **key, action="up", reason="ttft_slo") == 1
    assert _value(registry, "kvpilot_autoscaler_decisions_total", **key, action="hold", reason="prompt_demand") == 1
    assert _value(registry, "kvpilot_autoscaler_demand", **key, signal="prompt_tokens") == 1000
    assert _value(registry, "kvpilot_autoscaler_replica_capacity", **key, signal="prompt_tokens") == planner.prefill_tps
    assert _value(registry, "kvpilot_autoscaler_demand", **key, signal="sequences") is None   # not a decode pool


def test_every_alert_has_a_runbook_paragraph() -> None:
    runbook = (REPO / "docs" / "alerts.md").read_text()
    headings = {line[3:].strip() for line in runbook.splitlines() if line.startswith("## ")}
    for group in rule_groups()["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] in headings, rule["alert"]
                assert rule["annotations"]["runbook_url"].endswith("docs/alerts.md#" + rule["alert"].lower())
