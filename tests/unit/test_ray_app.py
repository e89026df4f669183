"""The simulator's Serve app (`kvpilot.ray.app.build_app`), built but not run: what its engine
deployment's request router is configured with."""

from __future__ import annotations

from typing import Any

import pytest

from kvpilot.ray.app import build_app
from kvpilot.sim.profiles import get_profile

pytestmark = pytest.mark.unit
PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router.PrefixCacheAffinityRouter"


def _router_kwargs(**app: Any) -> dict[str, Any]:
    # Serve keeps a bound app's deployments on private attributes; no public accessor exists in 2.60.
    engine = build_app(**app)._bound_deployment.init_args[0]._bound_deployment
    assert engine.name == "SimEngine"
    kwargs: dict[str, Any] = engine._deployment_config.request_router_config.request_router_kwargs
    return kwargs


@pytest.mark.parametrize("profile", ["h100-llama3-8b", "h100-qwen2.5-7b", "h100-qwen2.5-0.5b"])
def test_the_router_sizes_its_shadow_caches_to_the_engines(profile: str) -> None:
    """The router's shadow caches hold as many blocks as the simulated engines' KV cache: smaller,
    they forget prefixes the engines still hold and a request leaves its cache for nothing."""
    kwargs = _router_kwargs(replicas=2, router="dualmap", profile=profile, time_scale=0.25, slo_ttft_s=3.0)
    engine = get_profile(profile)
    assert kwargs["kv_capacity_tokens"] == engine.kv_capacity_tokens
    assert kwargs["block_size"] == engine.block_size
    assert (kwargs["policy"], kwargs["slo_ttft_s"], kwargs["time_scale"]) == ("dualmap", 3.0, 0.25)


def test_a_routers_own_kwargs_pass_through_untouched() -> None:
    """Another Serve router (e.g. PrefixCacheAffinityRouter) gets only the kwargs it was given."""
    kwargs = _router_kwargs(replicas=2, router=None, router_class=PREFIX_ROUTER,
                            router_kwargs={"imbalanced_threshold": 5})
    assert kwargs == {"imbalanced_threshold": 5}
