"""Generated LLMService specs against the real apiserver and operator (issue #22): each is rejected
by the CRD schema, or stored and then either fully reconciled or marked Degraded with a reason and
no children; never half-applied. The strategies and the contract: `kvpilot.testing.spec_fuzz`.

Bounded for CI (`KVPILOT_SPEC_FUZZ_EXAMPLES`, default 60, derandomized: about half reach the
operator); the long recorded run is in bench/results/fuzz_router.md.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from pydantic import ValidationError

from kvpilot.crds import LLMServiceSpec
from kvpilot.names import LABEL_SERVICE, pool_name
from kvpilot.operator.render import router_name
from kvpilot.testing.k8s import ControlPlane
from kvpilot.testing.spec_fuzz import BASE, specs

Get = Callable[..., Any]
Operator = Any  # conftest.Operator
EXAMPLES = int(os.environ.get("KVPILOT_SPEC_FUZZ_EXAMPLES", "60"))
# Specs once found half-applied, kept as fixed examples: fields a Pod rejects (now Degraded,
# InvalidPodFields) and an emoji in what the operator applies (now sent as UTF-8).
KNOWN = [{**BASE, "engine": {**BASE["engine"], "env": [{"name": "\u00ee\u00b1", "value": "x"}]}},
         {**BASE, "decode": {**BASE["decode"], "nodeSelector": {"💥" * 20: "x"}}},
         {**BASE, "decode": {**BASE["decode"], "resources": {"requests": {"memory": "lots"}}}},
         {**BASE, "model": {"name": "💥" * 300}}]


class Api:
    """Plain HTTPS to the apiserver with the admin client cert: a kubectl process per example
    would cost more than the example."""

    def __init__(self, plane: ControlPlane) -> None:
        self.server = plane.server
        self.ctx = ssl.create_default_context(cafile=str(plane.pki / "ca.crt"))
        self.ctx.load_cert_chain(str(plane.pki / "admin.crt"), str(plane.pki / "admin.key"))

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


def _expected_pools(name: str, spec: dict[str, Any]) -> set[str] | None:
    """The WorkerPools a stored spec should get, by the operator's own parse (None: Ray Serve's
    RayService instead, or a spec the operator cannot parse, which must be Degraded)."""
    try:
        parsed = LLMServiceSpec.model_validate(spec)
    except ValidationError:
        return None
    if parsed.engine.type == "ray-serve":
        return None
    return {pool_name(name, role) for role in parsed.pools()}


def test_generated_llmservice_specs_are_rejected_or_applied_whole(
        crds: ControlPlane, operator: Operator, namespace: str) -> None:
    api = Api(crds)
    base = f"/apis/kvpilot.io/v1alpha1/namespaces/{namespace}/llmservices"
    stored: dict[str, dict[str, Any]] = {}
    statuses: Counter[int] = Counter()
    seq = iter(range(10**6))

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(spec=specs())
    @example(spec=KNOWN[0])
    @example(spec=KNOWN[1])
    @example(spec=KNOWN[2])
    @example(spec=KNOWN[3])
    def one(spec: dict[str, Any]) -> None:
        name = f"fz-{next(seq)}"
        status, answer = api.call("POST", base, {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService",
                                                 "metadata": {"name": name}, "spec": spec})
        statuses[status] += 1
        if status == 201:
            stored[name] = answer
            return
        # Rejected: a 4xx Status that says why, and nothing stored under the name.
        assert status in (400, 422), (status, answer)
        assert answer.get("kind") == "Status" and answer.get("message"), answer
        assert api.call("GET", f"{base}/{name}")[0] == 404

    started = time.monotonic()
    one()
    posted = time.monotonic()
    assert statuses[201] and (statuses[422] + statuses[400]), statuses   # the strategy reaches both sides

    # Every stored spec is handled: the operator has written a status for its generation.
    def handled(obj: Any) -> bool:
        st = obj.get("status") or {}
        return st.get("observedGeneration") == obj["metadata"]["generation"] and bool(st.get("conditions"))

    deadline = time.monotonic() + 180
    pending = set(stored)
    while pending and time.monotonic() < deadline:
        items = api.call("GET", base)[1]["items"]
        pending = {o["metadata"]["name"] for o in items if not handled(o)} & set(stored)
        time.sleep(0.5)
    assert not pending, f"no status for {sorted(pending)[:5]}…\n{operator.log_tail()}"
    handled_at = time.monotonic()

    def children(kind_path: str) -> dict[str, set[str]]:
        """Objects labelled with a service, by service."""
        items = api.call("GET", f"{kind_path}?labelSelector={LABEL_SERVICE}")[1]["items"]
        out: dict[str, set[str]] = {}
        for o in items:
            out.setdefault(o["metadata"]["labels"][LABEL_SERVICE], set()).add(o["metadata"]["name"])
        return out

    # The whole set, or nothing. Pools' Deployments come from the WorkerPool handler a moment later.
    problems: list[str] = []
    deadline = time.monotonic() + 60
    while True:
        items = {o["metadata"]["name"]: o for o in api.call("GET", base)[1]["items"]}
        pools = children(f"/apis/kvpilot.io/v1alpha1/namespaces/{namespace}/workerpools")
        deps = children(f"/apis/apps/v1/namespaces/{namespace}/deployments")
        problems = []
        for name in stored:
            obj = items[name]
            conditions = {c["type"]: c for c in obj["status"]["conditions"]}
            degraded = conditions.get("Degraded", {}).get("status") == "True"
            have_pools, have_deps = pools.get(name, set()), deps.get(name, set())
            if degraded:
                cond = conditions["Degraded"]
                if not (cond.get("reason") and cond.get("message")):
                    problems.append(f"{name}: Degraded without a reason: {cond}")
                if have_pools or have_deps:
                    problems.append(f"{name}: Degraded but half-applied: {have_pools | have_deps}")
                continue
            want = _expected_pools(name, obj["spec"])
            if want is None:   # Ray Serve: its RayService, never kvpilot's pools or router
                if have_pools or router_name(name) in have_deps:
                    problems.append(f"{name}: ray-serve with kvpilot children: {have_pools | have_deps}")
                continue
            if have_pools != want or have_deps != want | {router_name(name)}:
                problems.append(f"{name}: pools {sorted(have_pools)} deployments {sorted(have_deps)}, "
                                f"want {sorted(want)} + router; spec {json.dumps(obj['spec'])[:300]}")
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not problems, "\n".join(problems[:10])
    # Nothing belongs to a spec that was never stored.
    assert set(pools) | set(deps) <= set(stored)
    degraded_now = {n for n in stored if n not in pools}
    assert len(degraded_now) >= 3, "the known invalid examples must end Degraded"
    print(f"spec fuzz: {EXAMPLES} examples, answers {dict(statuses)}, stored {len(stored)} "
          f"({len(degraded_now)} without pools); posted in {posted - started:.1f} s, "
          f"statuses {handled_at - posted:.1f} s, children {time.monotonic() - handled_at:.1f} s")
