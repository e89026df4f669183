"""The router's own Prometheus metrics (what it saw, as opposed to what engines report)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The `role` label of per-pool metrics and the queue-depth name: the autoscaler reads them back, so
# they are spelled once, in kvpilot.names.
from kvpilot.names import POOL_ROLE_LABEL as POOL_ROLE_LABEL
from kvpilot.names import QUEUE_DEPTH

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvpilot_router_requests", "Requests by model and outcome.",
                                ["model", "outcome"], registry=r)
        self.decisions = Counter("kvpilot_router_decisions", "Routing decisions by model, pool role and reason.",
                                 ["model", "role", "reason"], registry=r)
        self.retries = Counter("kvpilot_router_retries", "Upstream attempts retried before the first byte.",
                               ["model"], registry=r)
        self.upstream_errors = Counter("kvpilot_router_upstream_errors", "Failed upstream attempts by endpoint.",
                                       ["model", "endpoint"], registry=r)
        self.breaker_opened = Counter("kvpilot_router_breaker_opened", "Circuit breakers opened by endpoint.",
                                      ["model", "endpoint"], registry=r)
        self.ttft = Histogram("kvpilot_router_time_to_first_token_seconds", "TTFT seen at the router.",
                              ["model"], buckets=_LATENCY, registry=r)
        self.tpot = Histogram("kvpilot_router_time_per_output_token_seconds", "Mean inter-chunk time per stream.",
                              ["model"], buckets=_LATENCY, registry=r)
        self.inflight = Gauge("kvpilot_router_inflight", "Requests in flight by endpoint.",
                              ["model", "endpoint"], registry=r)
        self.migrations = Counter("kvpilot_router_migrations", "Live migrations asked for, by outcome.",
                                  ["model", "outcome"], registry=r)
        self.migration_blocking = Histogram("kvpilot_router_migration_blocking_seconds",
                                            "Stop-and-copy window of completed migrations.", ["model"],
                                            buckets=_LATENCY, registry=r)
        self.queued = Counter("kvpilot_router_queued_requests", "Requests that waited in a router-side queue.",
                              ["model", "role"], registry=r)
        self.queue_depth = Gauge(QUEUE_DEPTH, "Requests held in the router-side queue per endpoint.",
                                 ["model", "role", "endpoint"], registry=r)
        self.prefill_token_s = Gauge("kvpilot_router_prefill_token_seconds",
                                     "The TTFT predictor's per-token prefill time per endpoint, calibrated online.",
                                     ["model", "role", "endpoint"], registry=r)
        self.loop_lag = Gauge("kvpilot_router_event_loop_lag_seconds",
                              "How late the router's periodic queue tick ran: high when the router is CPU-bound.",
                              registry=r)
        self.hold_bypassed = Gauge("kvpilot_router_hold_bypassed",
                                   "1 while new requests skip the router-side queues because the router lags.",
                                   registry=r)
        self.kv_replays = Counter("kvpilot_router_kv_event_replays", "KV-event replays fetched from an instance "
                                  "after missed batches, by outcome.", ["model", "endpoint", "outcome"], registry=r)
        self.members = Gauge("kvpilot_router_healthy_endpoints", "Endpoints the policy may choose.",
                             ["model", "role"], registry=r)
