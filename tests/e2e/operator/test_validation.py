"""Invalid LLMServices are rejected by the apiserver itself, with a message that names the problem."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvpilot.testing.k8s import ControlPlane


def _svc(name: str, spec: dict[str, Any]) -> str:
    return json.dumps({"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": name},
                       "spec": spec})


MODEL = {"name": "m"}


@pytest.mark.parametrize("spec, message", [
    ({"model": MODEL, "decode": {"replicas": -1}}, "spec.decode.replicas: Invalid value: -1"),
    ({"model": MODEL, "decode": {"minReplicas": 3, "maxReplicas": 2, "replicas": 2}},
     "minReplicas must be less than or equal to maxReplicas"),
    ({"model": MODEL, "engine": {"type": "tgi"}}, 'spec.engine.type: Unsupported value: "tgi"'),
    ({"engine": {"type": "vllm"}}, "spec.model: Required value"),
    ({"model": MODEL, "mode": "aggregated", "prefill": {}}, "prefill is only used in disaggregated mode"),
    ({"model": MODEL, "kvTransfer": {"backend": "redis"}}, "kvTransfer.redisURL is required"),
    ({"model": MODEL, "slo": {"attainment": 0}}, "spec.slo.attainment"),
    ({"model": MODEL, "engine": {"type": "simulator"}, "routing": {"migration": True}},
     "routing.migration on simulator engines needs kvTransfer.backend redis"),
    ({"model": MODEL, "engine": {"type": "ray-serve"}, "decode": {"gpus": 8, "tensorParallel": 8,
                                                                 "pipelineParallel": 2}},
     "gpus must be a multiple of tensorParallel × pipelineParallel"),
    ({"model": MODEL, "autoscaling": {"enabled": True, "metricsSource": "graphite"}},
     'spec.autoscaling.metricsSource: Unsupported value: "graphite"'),
], ids=["negative-replicas", "min-gt-max", "unknown-engine", "missing-model", "prefill-in-aggregated",
        "redis-without-url", "zero-attainment", "sim-migration-without-redis", "gpus-short-of-tp-times-pp",
        "unknown-metrics-source"])
def test_invalid_llmservice_rejected(crds: ControlPlane, spec: dict[str, Any], message: str) -> None:
    out = crds.kubectl("create", "--dry-run=server", "-n", "default", "-f", "-", input=_svc("bad", spec))
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_long_names_rejected(crds: ControlPlane) -> None:
    out = crds.kubectl("create", "--dry-run=server", "-n", "default", "-f", "-", input=_svc("x" * 60, {"model": MODEL}))
    assert out.returncode != 0 and "at most 52 characters" in out.stderr, out.stderr


def test_workerpool_rejects_negative_scale(crds: ControlPlane) -> None:
    pool = {"apiVersion": "kvpilot.io/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "p"},
            "spec": {"service": "s", "role": "decode", "replicas": -2, "model": MODEL}}
    out = crds.kubectl("create", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(pool))
    assert out.returncode != 0 and "spec.replicas" in out.stderr, out.stderr
