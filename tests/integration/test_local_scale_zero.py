"""Scale to zero and back on `kvpilot up`: a pool at zero replicas wakes on the first request,
which the router holds until a worker serves it (the client sees a slow first answer, no error),
and goes back to zero after its stabilisation window; in P/D both pools wake for one request."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import openai
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.local import LocalControlPlane, load_service
from kvpilot.procs import wait_for

SPEC = """
apiVersion: kvpilot.io/v1alpha1
kind: LLMService
metadata: {{name: {name}}}
spec:
  model: {{name: tiny, servedName: tiny}}
  engine: {{type: simulator, profile: h100-qwen2.5-0.5b}}
  mode: {mode}
  {pools}
  routing: {{policy: least-loaded}}
  autoscaling: {{enabled: true, scaleDownStabilizationSeconds: 3}}
"""
AT_ZERO = "{replicas: 0, minReplicas: 0, maxReplicas: 2}"


def _plane(tmp_path: Path, name: str, mode: str, pools: str) -> LocalControlPlane:
    spec = tmp_path / "svc.yaml"
    spec.write_text(SPEC.format(name=name, mode=mode, pools=pools))
    return LocalControlPlane(load_service(spec), workdir=tmp_path / "plane", interval_s=1.0)


def _routed_to(plane: LocalControlPlane) -> float:
    """The router's healthy endpoints, from its own metrics."""
    with urllib.request.urlopen(plane.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "kvpilot_router_healthy_endpoints")


def _events(plane: LocalControlPlane) -> str:
    return "\n".join(f"{e.time:.1f} {e.pool} {e.before}->{e.after} {e.reason}" for e in plane.events)


def _ask(plane: LocalControlPlane) -> str:
    client = openai.OpenAI(base_url=plane.url + "/v1", api_key="none", max_retries=0, timeout=60)
    out = client.completions.create(model="tiny", prompt="hello from zero", max_tokens=4)
    return out.choices[0].text


def test_an_aggregated_pool_goes_zero_one_zero_and_its_first_request_just_waits(tmp_path: Path) -> None:
    with _plane(tmp_path, "zero", "aggregated", f"decode: {AT_ZERO}") as plane:
        assert plane.workers == {}
        assert _ask(plane)                                  # held through the cold start, then served
        wakes = [e for e in plane.events if (e.before, e.after) == (0, 1)]
        assert len(wakes) == 1 and "wake from zero" in wakes[0].reason, plane.events
        wait_for(lambda: not plane.workers and any((e.before, e.after) == (1, 0) for e in plane.events), 60,
                 f"the pool back at zero: {plane.events}")
        wait_for(lambda: _routed_to(plane) == 0, 30, "the router to drop the retired worker")
        assert _ask(plane)                                  # and it wakes again
        assert sum((e.before, e.after) == (0, 1) for e in plane.events) == 2, _events(plane)


def test_a_disaggregated_service_wakes_both_pools_for_one_request(tmp_path: Path) -> None:
    with _plane(tmp_path, "pdzero", "disaggregated", f"prefill: {AT_ZERO}\n  decode: {AT_ZERO}") as plane:
        assert _ask(plane)
        wakes = {e.pool: e for e in plane.events if (e.before, e.after) == (0, 1)}
        assert set(wakes) == {"prefill", "decode"}, plane.events
        assert all("wake from zero" in e.reason for e in wakes.values())
        # Together: one decision after the other in the same interval, not one cold start apart.
        at = [i for i, e in enumerate(plane.events) if (e.before, e.after) == (0, 1)]
        assert at == [at[0], at[0] + 1], plane.events
