"""Cross-instance prefix sharing: the router's cost model with a shared KV store, and the
virtual-time cluster's store (engines load what another instance prefilled)."""

from __future__ import annotations

import pytest

from kvpilot.router.estimate import LoadEstimator
from kvpilot.router.policy import InstanceLoad, PolicyContext, RequestView
from kvpilot.sim.cluster import Cluster, ClusterConfig
from kvpilot.sim.workload import RequestSpec

BS = 16


def view(rid: str, blocks: int, tail: int = 0) -> RequestView:
    hashes = [1000 + i for i in range(blocks)] + [5000 + tail]
    return RequestView(rid, (blocks + 1) * BS, hashes)


@pytest.mark.parametrize("shared", [False, True])
def test_a_stored_prefix_costs_a_load_at_an_instance_that_never_computed_it(shared: bool) -> None:
    ctx = PolicyContext(block_size=BS, shared_store=shared, store_token_cost=0.25)
    est = LoadEstimator(ctx, attention_tokens=0)
    est.track([InstanceLoad("a"), InstanceLoad("b")])
    est.dispatched(view("r1", 40), "a")
    again = view("r2", 40, tail=1)
    assert est.uncached("a", again) == BS                 # the owner: only the new block
    # Another instance: with the store, 40 blocks loaded at a quarter of a prefill each, plus the tail.
    assert est.uncached("b", again) == (40 * BS // 4 + BS if shared else 41 * BS)
    # The owner stays the better of the two: a local hit is still cheaper than a load.
    assert est.better_of("b", "a", again)[0] == "a"


def specs(n: int, gap: float) -> list[RequestSpec]:
    """`n` requests sharing a 2048-token document, each with its own 512-token question."""
    return [RequestSpec(f"r{i}", i * gap, 2560, 4, [7, 8, 9, 10, 100 + i]) for i in range(n)]


def test_cluster_store_lets_an_instance_load_what_another_prefilled() -> None:
    def run(store: bool) -> tuple[int, int]:
        cluster = Cluster(ClusterConfig(instances=2, policy="round-robin", block_size=BS, shared_store=store,
                                        store_token_cost=0.0))
        report = cluster.run(specs(6, 1.0))
        assert len(report.results) == 6
        return (sum(e.counters.prompt_tokens_external for e in cluster.engines),
                sum(e.counters.prompt_tokens_local_compute for e in cluster.engines))

    (loaded, computed), (none, alone) = run(True), run(False)
    # Round-robin sends r1 to the instance that never saw the document: with the store it loads
    # it (one document's worth, 2048 tokens), and computes that much less.
    assert none == 0 and loaded == 2048 and computed == alone - 2048
    with pytest.raises(ValueError, match="shared store"):
        Cluster(ClusterConfig(route_by_store=True))


def test_cluster_models_a_load_as_a_share_of_a_prefill() -> None:
    cluster = Cluster(ClusterConfig(instances=2, policy="round-robin", block_size=BS, shared_store=True,
                                    store_token_cost=0.25))
    cluster.run(specs(2, 1.0))
    assert sum(e.counters.prompt_tokens_external for e in cluster.engines) == 2048 * 3 // 4


def test_router_config_turns_sharing_on_only_over_a_redis_store() -> None:
    from kvpilot.router.config import RouterConfig
    from kvpilot.router.runtime import Runtime

    def model(**kv: object) -> dict[str, object]:
        return {"name": "m", "engine": "vllm", "endpoints": [{"name": "a", "url": "http://127.0.0.1:1"}],
                "kvTransfer": {"backend": "redis", **kv}}

    on = Runtime(RouterConfig.model_validate({"models": [model(sharePrefixes=True, storeTokenCost=0.5)]}))
    est = on.models["m"].main.policy.cache_estimate()
    assert est is not None and est.store is not None and est.context.store_token_cost == 0.5  # type: ignore[attr-defined]
    off = Runtime(RouterConfig.model_validate({"models": [model()]}))
    assert off.models["m"].main.policy.cache_estimate().store is None  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="needs backend redis"):
        RouterConfig.model_validate({"models": [{**model(), "kvTransfer": {"backend": "nixl", "sharePrefixes": True}}]})
