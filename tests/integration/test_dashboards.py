"""Every dashboard query and every rule expression answers on a real Prometheus scraping the local
control plane under load (`kvpilot up --prometheus`), and the check catches a dropped metric.

The operator's panels and rules need a real apiserver: tests/e2e/operator/test_operator_dashboard.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from kvpilot.crds import LLMService
from kvpilot.dashboards.browser import panel_status
from kvpilot.dashboards.queries import Expr, load_all, metric_names, problems
from kvpilot.local import LocalControlPlane
from kvpilot.procs import wait_for
from kvpilot.testing.redis import RedisServer

SPEC = """
apiVersion: kvpilot.io/v1alpha1
kind: LLMService
metadata: {name: dash}
spec:
  model: {name: meta-llama/Llama-3.1-8B-Instruct, servedName: llama-8b}
  engine: {type: simulator, profile: h100-llama3-8b}
  mode: aggregated
  decode: {replicas: 2, minReplicas: 2, maxReplicas: 4}
  routing: {policy: dualmap, migration: true}
  slo: {ttftMs: 1, tpotMs: 100, attainment: 0.9}
  autoscaling: {enabled: true, scaleDownStabilizationSeconds: 60}
  kvTransfer: {backend: redis, redisURL: REDIS}
"""
# A TTFT target no engine meets, so the autoscaler scales up whatever this machine's speed: on a quiet
# machine the load alone stays inside a 2 s SLO and every decision is "hold".
PREFIXES = [f"You are assistant {i}. " + "Answer briefly and cite the manual. " * 60 for i in range(6)]


def operator_only(e: Expr) -> bool:
    return e.where.startswith("operator:") or any(n.startswith("kvpilot_operator_") for n in metric_names(e.expr))


def _load(url: str, model: str, stop: threading.Event) -> None:
    """Streaming completions on shared prefixes (cache hits, TTFT and TPOT), 24 at a time."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

    def one(i: int) -> None:
        while not stop.is_set():
            try:
                stream = client.completions.create(model=model, prompt=PREFIXES[i % len(PREFIXES)] + f"question {i}",
                                                   max_tokens=32, stream=True)
                for _ in stream:
                    pass
            except openai.APIError:
                time.sleep(0.1)
            i += 24

    with ThreadPoolExecutor(24) as pool:
        for i in range(24):
            pool.submit(one, i)


def _migrate_one(url: str, admin_url: str, model: str) -> dict[str, Any]:
    """A long stream moved to another worker through the router's API while the client reads on."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    result: dict[str, Any] = {}

    def migrate(rid: str) -> None:
        req = urllib.request.Request(admin_url + "/kvpilot/migrate", json.dumps({"request_id": rid}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                result.update(json.loads(resp.read()))
        except urllib.error.HTTPError as err:
            result.update(json.loads(err.read()))
        except OSError as err:
            result.update({"outcome": "no answer", "reason": str(err)})

    for attempt in range(5):
        rid, result = f"dash-migrate-{attempt}", {}
        thread = threading.Thread(target=migrate, args=(rid,))
        stream = client.completions.create(model=model, prompt=PREFIXES[0] + "tell a long story", max_tokens=1500,
                                           stream=True, extra_headers={"X-Request-Id": rid})
        try:
            for n, _ in enumerate(stream):
                if n == 5:
                    thread.start()
        except openai.APIError:
            pass  # the autoscaler retired the worker it ran on: try another stream
        if thread.is_alive() or thread.ident is not None:
            thread.join()
        if result.get("outcome") == "migrated":
            break
    return result


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[LocalControlPlane]:
    service = LLMService.model_validate(yaml.safe_load(SPEC.replace("REDIS", redis_server.url)))
    with LocalControlPlane(service, time_scale=10, prometheus=True, scrape_interval="1s",
                           workdir=tmp_path_factory.mktemp("dash")) as plane:
        moved = _migrate_one(plane.url, plane.admin_url, plane.model)   # before the load: no scale event under its feet
        assert moved.get("outcome") == "migrated", moved
        stop = threading.Event()
        loader = threading.Thread(target=_load, args=(plane.url, plane.model, stop), daemon=True)
        loader.start()
        try:
            prom = plane.monitoring.prometheus if plane.monitoring else None
            assert prom is not None
            # Rates need two scrapes inside their window and the recording rules an evaluation after them.
            wait_for(lambda: bool(prom.query("kvpilot:ttft_slo_attainment:ratio_rate5m"))
                     and bool(prom.query("kvpilot:tpot_slo_burn_rate:rate6h"))
                     and bool(prom.query('kvpilot_autoscaler_decisions_total{action!="hold"}'))
                     and bool(prom.query("kvpilot:router_shed:ratio_rate5m")), 90,
                     "the recording rules and a scaling decision")
            time.sleep(3)
            yield plane
        finally:
            stop.set()
            loader.join(timeout=70)


def test_every_query_and_rule_answers(plane: LocalControlPlane) -> None:
    assert plane.monitoring is not None and plane.monitoring.prometheus is not None
    prom = plane.monitoring.prometheus
    exprs = load_all()
    local = [e for e in exprs if not operator_only(e)]
    # Nothing but the operator's is left out, and each dashboard and rule group is in.
    assert {e.where.split(":")[0] for e in local if e.kind != "record" and e.kind != "alert"} == {
        "service-overview", "autoscaling", "router-cache"}
    assert sum(e.kind == "record" for e in local) == sum(e.kind == "record" for e in exprs)
    assert len([e for e in local if e.kind == "panel"]) >= 40
    found = problems(local, prom.query, prom.metric_names())
    assert not found, "\n".join(found)


def test_a_dropped_metric_fails_the_check(plane: LocalControlPlane) -> None:
    """What a renamed metric does to the check: a panel whose metric no target exports, and a rule
    fallback that still answers but names a missing series, are both reported."""
    assert plane.monitoring is not None and plane.monitoring.prometheus is not None
    prom = plane.monitoring.prometheus
    exprs = [e for e in load_all() if not operator_only(e)]
    known = prom.metric_names()
    waiting = next(e for e in exprs if "vllm:num_requests_waiting" in e.expr and e.kind == "panel")
    dropped = replace(waiting, expr=waiting.expr.replace("vllm:num_requests_waiting", "vllm:num_requests_queued"))
    shed = next(e for e in exprs if e.where == "rule kvpilot:router_shed_requests:rate5m")
    renamed = replace(shed, expr=shed.expr.replace("kvpilot_router_requests_total[", "kvpilot_router_request_total["))
    assert not problems([waiting, shed], prom.query, known)
    found = problems([dropped, renamed], prom.query, known)
    assert any("vllm:num_requests_queued" in p for p in found), found
    assert any("kvpilot_router_request_total" in p for p in found), found
    assert problems([replace(waiting, expr="sum(rate(vllm:num_requests_waiting{")], prom.query, known)


def test_rules_loaded_are_the_checked_in_ones(plane: LocalControlPlane) -> None:
    """Local Prometheus evaluates the same rules the chart ships."""
    assert plane.monitoring is not None and plane.monitoring.prometheus is not None
    rules = plane.monitoring.prometheus.api("/api/v1/rules")["data"]["groups"]
    loaded = {r.get("name") for g in rules for r in g["rules"]}
    checked_in = {e.where.split(" ", 1)[1] for e in load_all() if e.kind in ("record", "alert")}
    assert loaded == checked_in
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
    assert Path(plane.dir / "prometheus" / "rules.yaml").exists()


@pytest.mark.parametrize("uid", ["kvpilot-service", "kvpilot-autoscaling", "kvpilot-router"])
def test_viewer_renders_every_panel_in_chromium(plane: LocalControlPlane, uid: str) -> None:
    """The dashboards load: headless Chromium draws every panel of each from its PromQL, with data."""
    assert plane.monitoring is not None
    with urllib.request.urlopen(plane.monitoring.viewer_url + "dashboards.json", timeout=5) as resp:
        boards = {b["uid"]: b for b in json.loads(resp.read())}
    assert set(boards) == {"kvpilot-service", "kvpilot-autoscaling", "kvpilot-router", "kvpilot-operator"}
    rendered = panel_status(f"{plane.monitoring.viewer_url}?range=300#{uid}")
    expected = sum(p["type"] != "row" for p in boards[uid]["panels"])
    assert not rendered.error and rendered.panels == expected, rendered
    assert rendered.ok == expected, rendered.failed
