"""The operator's dashboard and alerts answer on a real Prometheus scraping a real operator that
reconciles LLMServices on the real apiserver (the local stack runs no operator: the other panels
are proven in tests/integration/test_dashboards.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml

from kvpilot.dashboards.queries import load_all, metric_names, problems
from kvpilot.procs import free_port, wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane
from kvpilot.testing.prometheus import PrometheusServer

Operator = Any  # conftest.Operator


def test_operator_panels_and_rules_answer(crds: ControlPlane, namespace: str, make_operator: Callable[..., Operator],
                                          prometheus_factory: Callable[..., PrometheusServer]) -> None:
    port = free_port()
    op = make_operator("--standalone", "-n", namespace, "--metrics-port", str(port), name="dash-operator")
    op.start()
    prom = prometheus_factory([f"127.0.0.1:{port}"])
    doc = yaml.safe_load((REPO_ROOT / "deploy" / "examples" / "simulator.yaml").read_text())
    doc["metadata"]["name"] = "dash"
    out = crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    assert out.returncode == 0, out.stderr
    exprs = [e for e in load_all()
             if e.where.startswith("operator:") or any(n.startswith("kvpilot_operator_") for n in metric_names(e.expr))]
    assert {e.kind for e in exprs} >= {"panel", "alert", "variable"}
    wait_for(lambda: bool(prom.query(f'kvpilot_operator_llmservice_condition{{namespace="{namespace}"}}'))
             and bool(prom.query("rate(kvpilot_operator_reconciles_total[1m]) > 0")), 90,
             f"the operator's metrics in Prometheus\n{op.log_tail()}")
    found = problems(exprs, prom.query, prom.metric_names())
    assert not found, "\n".join(found)
    ready = prom.query(f'kvpilot_operator_llmservice_condition{{namespace="{namespace}", service="dash", '
                       f'type="Degraded"}}')
    assert [r["value"][1] for r in ready] == ["0"]
