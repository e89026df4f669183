"""Every PromQL expression in the generated dashboards and rules, and checks of them against a
live Prometheus. Pure Python (no Grafana SDK): tests, the local viewer and `kvpilot up` use it.

A dashboard's query holds Grafana variables; `instantiate` gives them the values an operator
sees with every variable at "All". An alert's expression returns nothing while it does not fire,
so `always_answers` turns its comparisons into `bool` ones: the expression then answers 0 or 1
for every series it watches, and an empty answer means a missing metric, not a quiet alert.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "deploy" / "dashboards"
RULES = REPO / "deploy" / "prometheus" / "rules.yaml"

GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$namespace": ".*",
                "$service": ".*", "$role": ".*"}
# Metric names kvpilot's expressions use: vLLM's, kvpilot's own and its recorded series (label
# names such as kvpilot_io_service are not metrics).
METRIC = re.compile(r"(?<![\w:])((?:vllm|kvpilot):[A-Za-z0-9_:]+|kvpilot_(?!io_)[A-Za-z0-9_]+)(?=\s*[{\[)\s]|$)")
COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s+(?!bool\b)")


@dataclass(frozen=True)
class Expr:
    where: str          # "service-overview: Time to first token [A]", "rule kvpilot:…", "alert KvpilotX"
    expr: str
    kind: str           # panel | annotation | variable | record | alert


def instantiate(expr: str) -> str:
    for var in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_VARS[var])
    return expr


def always_answers(expr: str) -> str:
    return COMPARISON.sub(lambda m: f" {m.group(1)} bool ", expr)


def metric_names(expr: str) -> set[str]:
    return {m.group(1) for m in METRIC.finditer(expr)}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_exprs(doc: dict[str, Any], board: str) -> Iterator[Expr]:
    for p in _panels(doc.get("panels", [])):
        for t in p.get("targets", []):
            yield Expr(f"{board}: {p['title']} [{t['refId']}]", t["expr"], "panel")
    for a in doc.get("annotations", {}).get("list", []):
        if a.get("expr"):
            yield Expr(f"{board}: annotation {a['name']}", a["expr"], "annotation")
    for v in doc.get("templating", {}).get("list", []):
        query = v.get("query")
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query) if isinstance(query, str) else None
        if m:
            yield Expr(f"{board}: variable {v['name']}", m.group(1), "variable")


def rule_exprs(doc: dict[str, Any]) -> Iterator[Expr]:
    for group in doc["groups"]:
        for r in group["rules"]:
            if "record" in r:
                yield Expr(f"rule {r['record']}", r["expr"], "record")
            else:
                yield Expr(f"alert {r['alert']}", r["expr"], "alert")


def load_all(dashboards: Path = DASHBOARDS, rules: Path = RULES) -> list[Expr]:
    out: list[Expr] = []
    for path in sorted(dashboards.glob("*.json")):
        out += dashboard_exprs(json.loads(path.read_text()), path.stem)
    out += rule_exprs(yaml.safe_load(rules.read_text()))
    return out


def problems(exprs: list[Expr], query: Callable[[str], list[dict[str, Any]]],
             known: set[str]) -> list[str]:
    """What is wrong with each expression against a live Prometheus: an error, an empty answer,
    or a metric name no target exports (`known`: Prometheus' `__name__` values, recorded series
    included). Empty when every expression answers with data."""
    out: list[str] = []
    for e in exprs:
        missing = sorted(metric_names(e.expr) - known)
        if missing:
            out.append(f"{e.where}: no series named {', '.join(missing)}")
        promql = always_answers(instantiate(e.expr))
        try:
            if not query(promql):
                out.append(f"{e.where}: no data for {promql}")
        except RuntimeError as err:
            out.append(f"{e.where}: {err}")
    return out
