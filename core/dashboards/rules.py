"""kvpilot's Prometheus rules: SLO recording rules and the alerts operators act on.

One source for `deploy/prometheus/rules.yaml`, the chart's PrometheusRule and `kvpilot up
--prometheus`. Plain data (no Grafana SDK), so local mode can write it without the extra.

Labels: engines and routers carry the target labels their PodMonitor gives them (`namespace`,
`kvpilot_io_service`, `kvpilot_io_role`, `pod`); the autoscaler's and the operator's series name
the LLMService in their own `namespace` and `service` labels. The SLO comes from the autoscaler
(`kvpilot_autoscaler_slo_seconds`, whose `le` is the engine histogram's bucket bound at or below
the target), so each service is measured against its own `spec.slo`.

Burn rates follow the multi-window scheme of Google's SRE workbook. With attainment targets like
0.9 the error budget is 10%, so its 14.4× page threshold could never be reached; kvpilot pages at
6× over 1 h (confirmed over 5 m) and opens a ticket at 3× over 6 h (confirmed over 30 m).
"""

from __future__ import annotations

from typing import Any

WINDOWS = ("5m", "30m", "1h", "6h")
FAST, SLOW = (("1h", "5m"), 6), (("6h", "30m"), 3)
SVC = ("namespace", "kvpilot_io_service")
BY = "by (namespace, kvpilot_io_service)"
RUNBOOK = "https://github.com/kvpilot/kvpilot/blob/main/docs/alerts.md#"

# SLO kind → (engine histogram, the pool roles whose engines measure it)
SLO_HISTOGRAMS = {"ttft": ("vllm:time_to_first_token_seconds", 'kvpilot_io_role!="decode"'),
                  "tpot": ("vllm:inter_token_latency_seconds", 'kvpilot_io_role!="prefill"')}


def _slo_rules() -> list[dict[str, str]]:
    rules = [
        {"record": "kvpilot:slo_seconds",
         "expr": 'label_replace(max by (namespace, service, slo, le) (kvpilot_autoscaler_slo_seconds), '
                 '"kvpilot_io_service", "$1", "service", "(.*)")'},
        {"record": "kvpilot:slo_attainment_target",
         "expr": 'label_replace(max by (namespace, service) (kvpilot_autoscaler_slo_attainment_target), '
                 '"kvpilot_io_service", "$1", "service", "(.*)")'},
    ]
    for slo, (hist, roles) in SLO_HISTOGRAMS.items():
        for w in WINDOWS:
            rules += [
                {"record": f"kvpilot:{slo}_requests:rate{w}",
                 "expr": f"sum {BY} (rate({hist}_count{{{roles}}}[{w}]))"},
                {"record": f"kvpilot:{slo}_requests_within_slo:rate{w}",
                 "expr": f"sum {BY} (rate({hist}_bucket{{{roles}}}[{w}])"
                         f' and on (namespace, kvpilot_io_service, le) kvpilot:slo_seconds{{slo="{slo}"}})'},
                {"record": f"kvpilot:{slo}_slo_attainment:ratio_rate{w}",
                 "expr": f"kvpilot:{slo}_requests_within_slo:rate{w} / kvpilot:{slo}_requests:rate{w}"},
                {"record": f"kvpilot:{slo}_slo_burn_rate:rate{w}",
                 "expr": f"(1 - kvpilot:{slo}_slo_attainment:ratio_rate{w})"
                         f" / on (namespace, kvpilot_io_service) (1 - kvpilot:slo_attainment_target)"},
            ]
    return rules


def _router_rules() -> list[dict[str, str]]:
    shed = 'kvpilot_router_requests_total{outcome=~"error_(429|503)"}'
    return [
        # No shedding yet is 0, not "no data": the shed series appear with the first 429 or 503.
        {"record": "kvpilot:router_shed_requests:rate5m",
         "expr": f"sum {BY} (rate({shed}[5m])) or 0 * sum {BY} (rate(kvpilot_router_requests_total[5m]))"},
        {"record": "kvpilot:router_requests:rate5m",
         "expr": f"sum {BY} (rate(kvpilot_router_requests_total[5m]))"},
        {"record": "kvpilot:router_shed:ratio_rate5m",
         "expr": "kvpilot:router_shed_requests:rate5m / kvpilot:router_requests:rate5m"},
    ]


def _burn_alert(slo: str, name: str, windows: tuple[tuple[str, str], float], severity: str) -> dict[str, Any]:
    (long, short), factor = windows
    what = {"ttft": "time to first token", "tpot": "time per output token"}[slo]
    return {
        "alert": name,
        "expr": f"kvpilot:{slo}_slo_burn_rate:rate{long} > {factor}"
                f" and kvpilot:{slo}_slo_burn_rate:rate{short} > {factor}",
        "for": "2m" if severity == "critical" else "15m",
        "labels": {"severity": severity},
        "annotations": {
            "summary": f"{{{{ $labels.namespace }}}}/{{{{ $labels.kvpilot_io_service }}}} misses its {what} SLO: "
                       f"error budget burning {factor}× too fast over {long}",
            "description": f"{slo.upper()} SLO attainment over {long} and {short} leaves the error budget burning "
                           f"at {{{{ $value | humanize }}}}× (threshold {factor}×).",
            "runbook_url": RUNBOOK + name.lower()},
    }


def _alerts() -> list[dict[str, Any]]:
    alerts = [
        _burn_alert("ttft", "KvpilotTTFTBudgetBurnFast", FAST, "critical"),
        _burn_alert("ttft", "KvpilotTTFTBudgetBurnSlow", SLOW, "warning"),
        _burn_alert("tpot", "KvpilotTPOTBudgetBurnFast", FAST, "critical"),
        _burn_alert("tpot", "KvpilotTPOTBudgetBurnSlow", SLOW, "warning"),
    ]

    def alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> None:
        alerts.append({"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
                       "annotations": {"summary": summary, "description": description,
                                       "runbook_url": RUNBOOK + name.lower()}})

    pool = "{{ $labels.namespace }}/{{ $labels.service }} {{ $labels.pool }}"
    alert("KvpilotPoolBelowDesired",
          "max by (namespace, service, pool) (kvpilot_autoscaler_ready_replicas)"
          " < max by (namespace, service, pool) (kvpilot_autoscaler_desired_replicas)",
          "10m", "warning", f"{pool} has had fewer ready replicas than the autoscaler wants for 10 minutes",
          "Replicas the autoscaler asked for are not serving: usually GPUs are short (pods Pending) or "
          "engines fail to start. {{ $value }} replica(s) ready.")
    alert("KvpilotRouterShedding", "kvpilot:router_shed:ratio_rate5m > 0.05", "5m", "warning",
          "{{ $labels.namespace }}/{{ $labels.kvpilot_io_service }}: the router sheds "
          "{{ $value | humanizePercentage }} of requests (429/503)",
          "More than 5% of requests were refused over 5 minutes: queues full or no healthy endpoint.")
    alert("KvpilotKVTransferFailures",
          f"sum {BY} (rate(vllm:nixl_num_failed_transfers_total[5m])) > 0", "10m", "warning",
          "{{ $labels.namespace }}/{{ $labels.kvpilot_io_service }}: KV transfers fail",
          "Engines failed {{ $value | humanize }} KV imports per second over 5 minutes; each one recomputes "
          "its prompt (P/D hand-offs and migrations get slower, not wrong).")
    alert("KvpilotOperatorReconcileErrors",
          'sum by (kind) (rate(kvpilot_operator_reconciles_total{result="error"}[10m]))'
          " / sum by (kind) (rate(kvpilot_operator_reconciles_total[10m])) > 0.1", "15m", "warning",
          "The kvpilot operator fails {{ $value | humanizePercentage }} of its {{ $labels.kind }} reconciles",
          "More than 10% of reconciles ended in an error for 15 minutes; see the operator's log.")
    alert("KvpilotLLMServiceDegraded",
          'max by (namespace, service) (kvpilot_operator_llmservice_condition{type="Degraded"}) == 1', "5m",
          "warning", "LLMService {{ $labels.namespace }}/{{ $labels.service }} is Degraded",
          "The operator marked the service Degraded: its spec cannot be served as written (see "
          "`kubectl describe llmsvc`).")
    return alerts


def rule_groups() -> dict[str, Any]:
    """The rules file: {"groups": [...]}, as Prometheus and promtool read it."""
    return {"groups": [
        {"name": "kvpilot-slo", "rules": _slo_rules()},
        {"name": "kvpilot-router", "rules": _router_rules()},
        {"name": "kvpilot-alerts", "rules": _alerts()},
    ]}
