"""`spec_problems` catches what the operator would copy into pod templates and the apiserver would
reject only after the WorkerPools and the router exist (half-applied services the spec fuzzer found:
a unicode env name, an emoji nodeSelector key)."""

from __future__ import annotations

from typing import Any

import pytest

from kvpilot.crds import LLMServiceSpec
from kvpilot.operator.status import pod_field_errors, spec_problems


def _spec(**decode: Any) -> LLMServiceSpec:
    env = decode.pop("env", [])
    return LLMServiceSpec.model_validate({"model": {"name": "m"}, "mode": "aggregated",
                                          "engine": {"type": "simulator", "env": env}, "decode": decode})


def test_a_valid_pod_spec_has_no_problems() -> None:
    spec = _spec(env=[{"name": "HF_HOME", "value": "/x"}, {"name": "my.var-1"}],
                 nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "zone": ""},
                 tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                              {"key": "k", "operator": "Equal", "value": "v", "effect": "NoExecute",
                               "tolerationSeconds": 30}],
                 resources={"requests": {"cpu": "500m", "memory": "1Gi", "example.com/dev": 1},
                            "limits": {"memory": "1.5e9"}})
    assert pod_field_errors(spec) == []
    assert spec_problems(spec, []) == []


@pytest.mark.parametrize("decode, fragment", [
    ({"env": [{"name": "\u00ee\u00b1"}]}, "engine.env[0].name"),
    ({"env": [{"name": "A=B"}]}, "engine.env[0].name"),
    ({"nodeSelector": {"💥": "x"}}, "decode.nodeSelector"),
    ({"nodeSelector": {"zone": "a b"}}, "decode.nodeSelector"),
    ({"nodeSelector": {"Bad_Prefix/k": "v"}}, "decode.nodeSelector"),
    ({"tolerations": [{"operator": "Sometimes"}]}, "tolerations[0].operator"),
    ({"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]}, "tolerationSeconds"),
    ({"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}, "tolerations[0].value"),
    ({"tolerations": [{"key": "k", "colour": "red"}]}, "unknown field"),
    ({"resources": {"requests": {"memory": "lots"}}}, "resources.requests"),
    ({"resources": {"limits": {"cpu": "-1"}}}, "resources.limits"),
    ({"resources": {"requests": {"cpu": -2}}}, "resources.requests"),
])
def test_fields_a_pod_would_reject_make_the_spec_degraded(decode: dict[str, Any], fragment: str) -> None:
    problems = spec_problems(_spec(**decode), [])
    assert [p.reason for p in problems] == ["InvalidPodFields"]
    assert fragment in problems[0].message
