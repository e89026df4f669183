"""Cache-aware routing with SGLang's `cache_aware` semantics, on block hashes.

SGLang's router keeps an approximate radix tree of the text it sent to each worker. When the
load is imbalanced (max − min in-flight above an absolute threshold *and* max above a relative
multiple of min) it sends the request to the least-loaded worker. Otherwise it picks the worker
with the longest prefix match if the match covers more than `cache_threshold` of the prompt,
else the worker whose tree is smallest (most room). Here the tree is a shadow LRU of block
hashes per worker, which gives the same answers for prefix matches at block granularity.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvpilot.router.estimate import ShadowCache
from kvpilot.router.policy import BasePolicy, Decision, InstanceLoad, PolicyContext, RequestView

EXACT = 1 << 30


class CacheAware(BasePolicy):
    name = "cache-aware"

    def __init__(self, context: PolicyContext | None = None, *, cache_threshold: float = 0.5,
                 balance_abs_threshold: int = 32, balance_rel_threshold: float = 1.0001) -> None:
        super().__init__(context)
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold
        self.caches: dict[str, ShadowCache] = {}

    def _cache(self, name: str) -> ShadowCache:
        cache = self.caches.get(name)
        if cache is None:
            # Exact, like SGLang's radix tree: every block of every prompt, no sampling.
            cache = self.caches[name] = ShadowCache(self.context.kv_capacity_tokens // self.context.block_size,
                                                    max_blocks=EXACT, dense=EXACT)
        return cache

    def route(self, request: RequestView, instances: Sequence[InstanceLoad]) -> Decision:
        if not instances:
            raise LookupError("no instances to route to")
        loads = [i.in_flight for i in instances]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            return Decision(loads.index(lo), "balance")
        hashes = request.block_hashes
        matches = [self._cache(i.name).match(hashes) for i in instances]
        best = max(range(len(instances)), key=lambda i: (matches[i], -loads[i]))
        if hashes and matches[best] / len(hashes) > self.cache_threshold:
            return Decision(best, "cache-hit")
        smallest = min(range(len(instances)), key=lambda i: (len(self._cache(instances[i].name)), loads[i]))
        return Decision(smallest, "smallest-tree")

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        self._cache(instances[index].name).insert(request.block_hashes)
