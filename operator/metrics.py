"""Prometheus metrics of the operator itself: how often each kind is reconciled, how it ended, how long it took."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("kvpilot_operator_reconciles", "Reconcile calls by kind and result", ["kind", "result"])
DURATION = Histogram("kvpilot_operator_reconcile_seconds", "Reconcile wall time by kind", ["kind"],
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

API_REQUESTS = Counter("kvpilot_operator_api_requests", "apiserver requests made by the reconcile code (not kopf's)",
                       ["method", "resource"])
for _kind in ("LLMService", "WorkerPool"):   # every series from the start: an error rate reads 0, not "no data"
    for _result in ("ok", "error"):
        RECONCILES.labels(_kind, _result)
CONDITIONS = Gauge("kvpilot_operator_llmservice_condition", "1 while the LLMService's condition of this type is True",
                   ["namespace", "service", "type"])


def record_conditions(namespace: str, service: str, conditions: Iterable[Mapping[str, object]]) -> None:
    """The conditions the operator last wrote to an LLMService's status, for alerts and dashboards."""
    for c in conditions:
        CONDITIONS.labels(namespace, service, str(c["type"])).set(1.0 if c.get("status") == "True" else 0.0)


@contextmanager
def measured(kind: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILES.labels(kind, "error").inc()
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
    finally:
        DURATION.labels(kind).observe(time.perf_counter() - start)
