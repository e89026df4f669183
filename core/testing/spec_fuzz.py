"""Generated LLMService specs, valid and not, and what the cluster must make of each.

Used by tests/e2e/operator/test_spec_fuzz.py (a bounded, derandomized run in CI) and by its long
recorded run (bench/results/fuzz_router.md, "LLMService specs"). A spec starts from a small valid
simulator service and gets one to three mutations: a field set to a value of the wrong type, out of
range, an unknown enum, a huge or unicode string, a nested object where a scalar belongs; a field
(required or not) removed; an unknown field added. The contract each must meet:

- the apiserver rejects it (422/400, a `Status` naming the problem) and nothing exists; or
- it is stored, and the operator either says why it will not act (`Degraded=True` with a reason and
  a message) and creates no child at all, or creates the whole set: every WorkerPool of its mode,
  and (kvpilot's router, not Ray Serve) the router Deployment.

Values that would ask kwok for hundreds of pods (large but valid replica counts) are left out so a
run stays light; 2**31 and beyond stay in, since Kubernetes' own int32 fields reject them.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

BASE: dict[str, Any] = {
    "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
    "engine": {"type": "simulator", "profile": "h100-qwen2.5-0.5b"},
    "mode": "aggregated",
    "decode": {"replicas": 0, "gpus": 0},   # no engine pods: the run is about objects, not pods
    "routing": {"replicas": 1},
}

PATHS = (
    "model", "model.name", "model.uri", "model.servedName", "engine", "engine.type", "engine.image",
    "engine.args", "engine.env", "engine.profile", "mode", "prefill", "prefill.gpus", "prefill.replicas",
    "decode", "decode.gpus", "decode.tensorParallel", "decode.pipelineParallel", "decode.replicas",
    "decode.minReplicas", "decode.maxReplicas", "decode.nodeSelector", "decode.resources",
    "decode.resources.requests", "decode.tolerations", "routing", "routing.policy", "routing.replicas",
    "routing.blockSize", "routing.migration", "slo", "slo.ttftMs", "slo.tpotMs", "slo.attainment",
    "autoscaling.enabled", "autoscaling.metricsSource", "autoscaling.scaleDownStabilizationSeconds",
    "kvTransfer", "kvTransfer.backend", "kvTransfer.redisURL", "unknownField", "decode.unknownField",
)
INTS = (-(2**40), -1, 0, 1, 2, 3, 17, 2**31, 2**53)
FLOATS = (-0.5, 0.0, 0.5, 1.0, 1.5, 1e300)
WORDS = ("vllm", "simulator", "ray-serve", "tgi", "aggregated", "disaggregated", "dualmap", "cache-aware",
         "round-robin", "redis", "nixl", "lmcache", "pods", "prometheus", "h100-llama3-8b", "no-such-profile",
         "hf://Qwen/Qwen2.5-0.5B", "pvc://models/m", "ftp://x", "redis://127.0.0.1:1/0", "rediss://", "",
         " ", "Qwen/Qwen2.5-0.5B-Instruct", "nvidia.com/gpu", "1Gi", "-1", "NaN")
HUGE = ("x" * 70_000, "模型" * 20_000, "a/" * 1000, "💥" * 300)

text = st.text(max_size=30) | st.sampled_from(WORDS) | st.sampled_from(HUGE)
scalars = st.none() | st.booleans() | st.sampled_from(INTS) | st.sampled_from(FLOATS) | st.integers(-3, 70) | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=6)

small = st.integers(0, 3)
# Values of the right type (mostly in range) per path, so that half the mutations get past the
# schema and reach the operator: unknown profiles, huge or unicode names, label and quantity
# strings Kubernetes will not take, int32 overflows, engine and mode switches.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "model.name": text, "model.servedName": text, "engine.image": text,
    "model.uri": st.sampled_from(["hf://Qwen/Qwen2.5-0.5B", "pvc://models/m", "s3://b/k"]) | text.map("hf://".__add__),
    "engine.type": st.sampled_from(["vllm", "simulator", "ray-serve"]),
    "engine.args": st.lists(text, max_size=3),
    "engine.env": st.lists(st.fixed_dictionaries({"name": text}, optional={"value": text}), max_size=2),
    "engine.profile": st.sampled_from(["h100-qwen2.5-0.5b", "h100-llama3-8b", "no-such-profile"]) | text,
    "mode": st.sampled_from(["aggregated", "disaggregated"]),
    "prefill": st.fixed_dictionaries({}, optional={"replicas": small, "gpus": small}),
    "decode": st.fixed_dictionaries({}, optional={"replicas": small, "gpus": small}),
    "prefill.gpus": small, "prefill.replicas": small, "decode.gpus": small | st.just(64),
    "decode.tensorParallel": st.sampled_from([1, 2, 8, 64]), "decode.pipelineParallel": st.sampled_from([1, 2, 16]),
    "decode.replicas": small | st.sampled_from([2**31, 2**53]),
    "decode.minReplicas": small, "decode.maxReplicas": small,
    "decode.nodeSelector": st.dictionaries(text, text, max_size=2),
    "decode.resources.requests": st.dictionaries(st.sampled_from(["cpu", "memory", "nvidia.com/gpu"]) | text,
                                                 st.sampled_from(["1", "500m", "1Gi", "-1", "lots"]) | text,
                                                 max_size=2),
    "decode.tolerations": st.lists(st.dictionaries(st.sampled_from(["key", "operator", "effect", "value"]), text,
                                                   max_size=3), max_size=2),
    "routing.policy": st.sampled_from(["dualmap", "round-robin", "least-loaded", "consistent-hash", "cache-aware"]),
    "routing.replicas": st.integers(1, 3), "routing.blockSize": st.sampled_from([1, 16, 1024]),
    "routing.migration": st.booleans(), "slo.ttftMs": st.integers(1, 10**6), "slo.tpotMs": st.integers(1, 10**4),
    "slo.attainment": st.floats(0.01, 1.0), "autoscaling.enabled": st.booleans(),
    "autoscaling.metricsSource": st.sampled_from(["pods", "prometheus"]),
    "autoscaling.scaleDownStabilizationSeconds": st.integers(0, 3600) | st.just(2**53),
    "kvTransfer.backend": st.sampled_from(["redis", "nixl", "lmcache"]),
    "kvTransfer.redisURL": st.sampled_from(["redis://127.0.0.1:1/0", "rediss://r:6380"]) | text.map("redis://".__add__),
}


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path, replacing whatever non-object stands in the way."""
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[leaf] = value


def drop_path(spec: dict[str, Any], path: str) -> None:
    *parents, leaf = path.split(".")
    node: Any = spec
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """The valid base with one to three mutations (a tenth of the time none: a valid spec); a
    mutation drops the field, or sets it to a value of the right type (half of them) or any."""
    spec = copy.deepcopy(BASE)
    if draw(st.integers(0, 9)) == 0:
        return spec
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        roll = draw(st.integers(0, 5))
        if roll == 0:
            drop_path(spec, path)
        elif roll <= 3 and path in PLAUSIBLE:
            set_path(spec, path, draw(PLAUSIBLE[path]))
        else:
            set_path(spec, path, draw(values))
    return spec
