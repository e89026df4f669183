"""kvpilot's four Grafana dashboards: service overview, autoscaling, router and cache, operator.

Every query names metrics the stack exports (vLLM's names for engines; `kvpilot_router_*`,
`kvpilot_autoscaler_*`, `kvpilot_operator_*`; the `kvpilot:*` series recorded by
deploy/prometheus/rules.yaml). tests/integration/test_dashboards.py evaluates each against a live
local control plane, so a renamed or dropped metric fails there.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

from kvpilot.dashboards.panels import DS, ENGINE, RATE, ROUTER, SCALER, SERVICE, board, series, single, variables

SVC = 'namespace=~"$namespace", kvpilot_io_service=~"$service"'
TTFT, ITL = "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"


def _quantiles(hist: str, selector: str, slo: str) -> list[tuple[str, str]]:
    qs = [(f"histogram_quantile({q}, sum by (le) (rate({hist}_bucket{{{selector}}}[{RATE}])))", f"p{int(q * 100)}")
          for q in (0.5, 0.9, 0.99)]
    return [*qs, (f'max(kvpilot_autoscaler_slo_seconds{{{SERVICE}, slo="{slo}"}})', "SLO")]


def service_overview() -> dashboard.Dashboard:
    ttft_sel, tpot_sel = f'{ENGINE}, kvpilot_io_role!="decode"', f'{ENGINE}, kvpilot_io_role!="prefill"'
    d = board("kvpilot-service", "kvpilot / Service overview",
              "Per LLMService: traffic, TTFT and TPOT against the SLO, attainment and error-budget burn, shedding, "
              "queues.",
              variables())
    return (d.with_row(dashboard.Row("SLO"))
            .with_panel(single("TTFT SLO attainment (5m)", "Share of requests whose first token came within the "
                               "TTFT SLO (engine histograms, prefill or aggregated pools).",
                               f"min(kvpilot:ttft_slo_attainment:ratio_rate5m{{{SVC}}})", "percentunit",
                               red_below=0.9))
            .with_panel(single("TPOT SLO attainment (5m)", "Share of inter-token gaps within the TPOT SLO (decode "
                               "or aggregated pools).", f"min(kvpilot:tpot_slo_attainment:ratio_rate5m{{{SVC}}})",
                               "percentunit", red_below=0.9))
            .with_panel(single("TTFT budget burn (1h)", "How many times faster than allowed the error budget burns; "
                               "1 spends it exactly. Alerts at 6× (1h, 5m) and 3× (6h, 30m).",
                               f"max(kvpilot:ttft_slo_burn_rate:rate1h{{{SVC}}})", "x", red_above=1))
            .with_panel(single("TPOT budget burn (1h)", "As for TTFT, for time per output token.",
                               f"max(kvpilot:tpot_slo_burn_rate:rate1h{{{SVC}}})", "x", red_above=1))
            .with_panel(series("Time to first token", "Engine TTFT percentiles against the service's SLO.",
                               _quantiles(TTFT, ttft_sel, "ttft"), "s", dashed=("SLO",)))
            .with_panel(series("Time per output token", "Inter-token latency percentiles against the TPOT SLO.",
                               _quantiles(ITL, tpot_sel, "tpot"), "s", dashed=("SLO",)))
            .with_panel(series("SLO attainment", "Attainment over 5 minutes against the service's target.", [
                (f"kvpilot:ttft_slo_attainment:ratio_rate5m{{{SVC}}}", "TTFT {{kvpilot_io_service}}"),
                (f"kvpilot:tpot_slo_attainment:ratio_rate5m{{{SVC}}}", "TPOT {{kvpilot_io_service}}"),
                (f"max(kvpilot_autoscaler_slo_attainment_target{{{SERVICE}}})", "target")],
                "percentunit", max_val=1, dashed=("target",)))
            .with_panel(series("Error-budget burn rate", "Multi-window burn rates (1 = spending the budget exactly "
                               "over the SLO period).", [
                (f"kvpilot:{slo}_slo_burn_rate:rate{w}{{{SVC}}}", f"{slo.upper()} {w} {{{{kvpilot_io_service}}}}")
                for slo in ("ttft", "tpot") for w in ("5m", "1h", "6h")], "x"))
            .with_row(dashboard.Row("Traffic"))
            .with_panel(series("Requests by outcome", "What the router answered, per second.", [
                (f"sum by (kvpilot_io_service, outcome) (rate(kvpilot_router_requests_total{{{ROUTER}}}[{RATE}]))",
                 "{{kvpilot_io_service}} {{outcome}}"),
                (f"sum by (kvpilot_io_service) (rate(vllm:request_success_total{{{ENGINE}}}[{RATE}]))",
                 "{{kvpilot_io_service}} finished by engines")], "reqps"))
            .with_panel(series("Shedding (429/503)", "Share of requests the router refused over 5 minutes: full "
                               "queues (429) or no healthy endpoint (503). Alert above 5%.", [
                (f"kvpilot:router_shed:ratio_rate5m{{{SVC}}}", "{{kvpilot_io_service}}")], "percentunit"))
            .with_panel(series("Queue depths", "Requests waiting in engines and held in the router's queues.", [
                (f"sum by (kvpilot_io_role) (vllm:num_requests_waiting{{{ENGINE}}})",
                 "engines waiting {{kvpilot_io_role}}"),
                (f"sum by (kvpilot_io_role) (vllm:num_requests_running{{{ENGINE}}})",
                 "engines running {{kvpilot_io_role}}"),
                (f"sum by (role) (kvpilot_router_queue_depth{{{ROUTER}}})", "router held {{role}}")]))
            .with_panel(series("Tokens", "Prompt and generated tokens per second.", [
                (f"sum(rate(vllm:prompt_tokens_total{{{ENGINE}}}[{RATE}]))", "prompt"),
                (f"sum(rate(vllm:generation_tokens_total{{{ENGINE}}}[{RATE}]))", "generated")], "short")))


def autoscaling() -> dashboard.Dashboard:
    d = board("kvpilot-autoscaling", "kvpilot / Autoscaling",
              "Why the autoscaler did what it did: replicas per pool, each decision with its reason, demand against "
              "capacity, GPU-hours and cold starts.",
              variables())
    d = d.annotation(dashboard.AnnotationQuery().name("Scaling decisions").datasource(DS).enable(True)
                     .icon_color("orange")
                     .expr(f'sum by (service, pool, action, reason) (increase(kvpilot_autoscaler_decisions_total'
                           f'{{{SCALER}, action!="hold"}}[1m])) > 0'))
    demand = "kvpilot_autoscaler_demand{%s, signal=\"%s\"}"
    capacity = ("kvpilot_autoscaler_replica_capacity{%s, signal=\"%s\"} * on (namespace, service, pool) "
                "kvpilot_autoscaler_ready_replicas{%s}")
    return (d.with_panel(series("Replicas per pool", "Desired (planner), current (asked for) and ready (serving); "
                                "scaling decisions are annotated with their reason.", [
                (f"kvpilot_autoscaler_desired_replicas{{{SCALER}}}", "{{service}} {{pool}} desired"),
                (f"kvpilot_autoscaler_current_replicas{{{SCALER}}}", "{{service}} {{pool}} current"),
                (f"kvpilot_autoscaler_ready_replicas{{{SCALER}}}", "{{service}} {{pool}} ready")], w=24))
            .with_panel(series("Decisions by reason", "Decisions per interval by action and what drove them "
                               "(reason kinds: prompt_demand, decode_demand, ttft_slo, tpot_slo, kv_usage, "
                               "stabilising, starting, no_metrics).", [
                (f"sum by (action, reason) (increase(kvpilot_autoscaler_decisions_total{{{SCALER}}}[{RATE}]))",
                 "{{action}} {{reason}}")]))
            .with_panel(series("Starting replicas (cold starts)", "Replicas asked for but not serving yet, and "
                               "replicas added by scale-ups.", [
                (f"kvpilot_autoscaler_current_replicas{{{SCALER}}} - kvpilot_autoscaler_ready_replicas{{{SCALER}}}",
                 "{{service}} {{pool}} starting"),
                (f"sum by (service, pool) (increase(kvpilot_autoscaler_replicas_started_total{{{SCALER}}}[{RATE}]))",
                 "{{service}} {{pool}} started")]))
            .with_panel(series("Prompt demand vs capacity", "Uncached prompt tokens/s the planner sized for "
                               "(its forecast) against what the ready replicas sustain within the SLO.", [
                (demand % (SCALER, "prompt_tokens"), "{{service}} {{pool}} demand (forecast)"),
                (capacity % (SCALER, "prompt_tokens", SCALER), "{{service}} {{pool}} capacity")], "short"))
            .with_panel(series("Decode demand vs capacity", "Running sequences the planner sized for against the "
                               "sequences the ready replicas hold within the TPOT SLO.", [
                (demand % (SCALER, "sequences"), "{{service}} {{pool}} demand (forecast)"),
                (capacity % (SCALER, "sequences", SCALER), "{{service}} {{pool}} capacity")], "short"))
            .with_panel(single("GPU-hours (time range)", "GPU time held by the replicas asked for over the "
                               "dashboard's time range.",
                               f"sum(increase(kvpilot_autoscaler_gpu_seconds_total{{{SCALER}}}[$__range])) / 3600",
                               "short", w=8))
            .with_panel(single("Cold starts (time range)", "Replicas added by scale-ups over the time range.",
                               f"sum(increase(kvpilot_autoscaler_replicas_started_total{{{SCALER}}}[$__range]))",
                               "short", w=8))
            .with_panel(single("KV cache usage (mean)", "Engines' mean KV-cache usage; the planner adds a decode "
                               "replica above 90%.", f"avg(vllm:kv_cache_usage_perc{{{ENGINE}}})", "percentunit",
                               w=8, red_above=0.9))
            .with_panel(series("GPUs held", "GPUs held by each pool (GPU-seconds per second).", [
                (f"sum by (service, pool) (rate(kvpilot_autoscaler_gpu_seconds_total{{{SCALER}}}[{RATE}]))",
                 "{{service}} {{pool}}")], w=24)))


def router_cache() -> dashboard.Dashboard:
    d = board("kvpilot-router", "kvpilot / Router and cache",
              "How the router spreads load and how much cache it keeps: decisions by reason, per-endpoint load and "
              "imbalance, prefix-cache hits, KV usage, live migrations.",
              variables())
    running = f"vllm:num_requests_running{{{ENGINE}}}"
    return (d.with_panel(series("Routing decisions by reason", "affinity: the cache-affine candidate; "
                                "slo-fallback: the other one, to meet the TTFT SLO; rebalance/steal: moved off a hot "
                                "spot while queued.", [
                (f"sum by (role, reason) (rate(kvpilot_router_decisions_total{{{ROUTER}}}[{RATE}]))",
                 "{{role}} {{reason}}")], "reqps"))
            .with_panel(series("Load imbalance", "Busiest engine over the mean (1 = even), per pool.", [
                (f"max by (kvpilot_io_service, kvpilot_io_role) ({running}) / clamp_min(avg by "
                 f"(kvpilot_io_service, kvpilot_io_role) ({running}), 1)",
                 "{{kvpilot_io_service}} {{kvpilot_io_role}}")],
                "x"))
            .with_panel(series("Requests in flight per endpoint", "What the router has sent to each endpoint and "
                               "what each engine runs.", [
                (f"sum by (endpoint) (kvpilot_router_inflight{{{ROUTER}}})", "router → {{endpoint}}"),
                (f"sum by (pod) ({running})", "running {{pod}}")]))
            .with_panel(series("Router queue per endpoint", "Requests held in the router-side queue (late binding).",
                               [(f"sum by (endpoint) (kvpilot_router_queue_depth{{{ROUTER}}})", "{{endpoint}}")]))
            .with_panel(series("Prefix-cache hit rate", "Share of prompt tokens found in the engines' prefix "
                               "cache.", [
                (f"sum by (kvpilot_io_service, kvpilot_io_role) "
                 f"(rate(vllm:prefix_cache_hits_total{{{ENGINE}}}[{RATE}]))"
                 f" / sum by (kvpilot_io_service, kvpilot_io_role) (rate(vllm:prefix_cache_queries_total{{{ENGINE}}}"
                 f"[{RATE}]))", "{{kvpilot_io_service}} {{kvpilot_io_role}}")], "percentunit", max_val=1))
            .with_panel(series("KV cache usage", "Per engine; near 1 the engine preempts.", [
                (f"vllm:kv_cache_usage_perc{{{ENGINE}}}", "{{pod}}")], "percentunit", max_val=1))
            .with_panel(series("Live migrations", "Migrations asked for, by outcome.", [
                (f"sum by (outcome) (rate(kvpilot_router_migrations_total{{{ROUTER}}}[{RATE}]))", "{{outcome}}")],
                "ops"))
            .with_panel(series("Migration stop-and-copy time", "The window a migrated stream is paused.", [
                (f"histogram_quantile({q}, sum by (le) (rate(kvpilot_router_migration_blocking_seconds_bucket"
                 f"{{{ROUTER}}}[{RATE}])))", f"p{int(q * 100)}") for q in (0.5, 0.99)], "s"))
            .with_panel(series("KV bytes transferred", "KV imported from other instances (P/D, migrations) and "
                               "failed imports.", [
                (f"sum by (kvpilot_io_role) (rate(vllm:nixl_bytes_transferred_total{{{ENGINE}}}[{RATE}]))",
                 "{{kvpilot_io_role}}"),
                (f"sum(rate(vllm:nixl_num_failed_transfers_total{{{ENGINE}}}[{RATE}]))", "failed")], "Bps"))
            .with_panel(series("Router health", "Endpoints the policy may choose and the router's event-loop lag.", [
                (f"sum by (role) (kvpilot_router_healthy_endpoints{{{ROUTER}}})", "healthy {{role}}"),
                (f"max(kvpilot_router_event_loop_lag_seconds{{{ROUTER}}})", "loop lag (s)")])))


def operator() -> dashboard.Dashboard:
    d = board("kvpilot-operator", "kvpilot / Operator",
              "The operator's reconciles by result and duration, its apiserver requests and the conditions it "
              "writes to each LLMService.",
              variables(with_role=False)[:1])
    for name, label, metric in (("namespace", "Namespace", "namespace"), ("service", "LLMService", "service")):
        d = d.with_variable(dashboard.QueryVariable(name).label(label).datasource(DS)
                            .query(f"label_values(kvpilot_operator_llmservice_condition, {metric})")
                            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
                            .all_value(".*").current(model.VariableOption(selected=True, text="All", value="$__all")))
    cond = f"kvpilot_operator_llmservice_condition{{{SERVICE}}}"
    return (d.with_panel(series("Reconciles by result", "Reconcile calls per second by kind and result.", [
                (f"sum by (kind, result) (rate(kvpilot_operator_reconciles_total[{RATE}]))", "{{kind}} {{result}}")],
                "ops"))
            .with_panel(series("Reconcile duration", "Wall time of reconcile calls.", [
                (f"histogram_quantile({q}, sum by (kind, le) "
                 f"(rate(kvpilot_operator_reconcile_seconds_bucket[{RATE}])))",
                 f"{{{{kind}}}} p{int(q * 100)}") for q in (0.5, 0.99)], "s"))
            .with_panel(series("API requests", "apiserver requests by the reconcile code, by verb and resource.", [
                (f"sum by (method, resource) (rate(kvpilot_operator_api_requests_total[{RATE}]))",
                 "{{method}} {{resource}}")], "reqps"))
            .with_panel(series("LLMService conditions", "1 while a condition is True: Ready, Progressing, "
                               "Degraded.", [(cond, "{{namespace}}/{{service}} {{type}}")], max_val=1))
            .with_panel(single("Services not Ready", "LLMServices whose Ready condition is False.",
                               f'count({cond[:-1]}, type="Ready"}} == 0) or vector(0)', red_above=1))
            .with_panel(single("Services Degraded", "LLMServices whose spec cannot be served as written.",
                               f'count({cond[:-1]}, type="Degraded"}} == 1) or vector(0)', red_above=1)))


BOARDS = {"service-overview": service_overview, "autoscaling": autoscaling, "router-cache": router_cache,
          "operator": operator}

# Keys Grafana's Prometheus annotation editor writes that the SDK's AnnotationQuery does not model.
ANNOTATION_EXTRAS = {"Scaling decisions": {"titleFormat": "{{pool}} {{action}}",
                                           "textFormat": "{{service}}: {{reason}}",
                                           "tagKeys": "service,pool,action,reason", "step": "1m"}}


def render(name: str) -> dict[str, Any]:
    """One dashboard as the JSON Grafana imports."""
    doc: dict[str, Any] = json.loads(json.dumps(BOARDS[name]().build(), cls=JSONEncoder))
    for ann in doc.get("annotations", {}).get("list", []):
        ann.update(ANNOTATION_EXTRAS.get(ann.get("name", ""), {}))
    for i, panel in enumerate(doc["panels"], 1):   # rows included: Grafana wants every id unique
        panel["id"] = i
    return doc
