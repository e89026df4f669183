"""Cache-aware routing with SGLang's `cache_aware` semantics, on block hashes.

SGLang's router keeps an approximate radix tree of the text it sent to each worker. When the
load is imbalanced (max − min in-flight above an absolute threshold *and* max above a relative
multiple of min) it sends the request to the least-loaded worker. Otherwise it picks the worker
with the longest prefix match if the match covers more than `cache_threshold` of the prompt,
else the worker whose tree is smallest (most room). Here the tree is a shadow LRU of block
hashes per worker, which gives the same answers for prefix matches at block granularity.

A prompt enters its worker's tree when it is dispatched, as in SGLang (the next request with the
same prefix should follow it before the first has finished), but only tentatively: if the
dispatch ends without a first token (`on_complete` says it failed or was rejected) the worker
never computed those blocks, and they leave the tree again.
"""

from __future__ import annotations

from collections.abc import Sequence, Set

from kvpilot.router.estimate import EXACT, ShadowCache
from kvpilot.router.policy import (
    NOTHING,
    BasePolicy,
    Decision,
    InstanceLoad,
    Outcome,
    PolicyContext,
    RequestView,
    allowed,
)


class CacheAware(BasePolicy):
    name = "cache-aware"

    def __init__(self, context: PolicyContext | None = None, *, cache_threshold: float = 0.5,
                 balance_abs_threshold: int = 32, balance_rel_threshold: float = 1.0001) -> None:
        super().__init__(context)
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold
        self.caches: dict[str, ShadowCache] = {}
        self._claims: dict[str, tuple[str, list[int]]] = {}   # request → (worker, blocks it put there unconfirmed)

    def _cache(self, name: str) -> ShadowCache:
        cache = self.caches.get(name)
        if cache is None:
            # Exact, like SGLang's radix tree: every block of every prompt, no sampling.
            cache = self.caches[name] = ShadowCache(self.context.kv_capacity_tokens // self.context.block_size,
                                                    max_blocks=EXACT, dense=EXACT)
        return cache

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        ok = allowed(instances, excluded)
        loads = [instances[i].in_flight for i in ok]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            return Decision(ok[loads.index(lo)], "balance")
        hashes = request.block_hashes
        matches = [self._cache(instances[i].name).match(hashes) for i in ok]
        best = max(range(len(ok)), key=lambda k: (matches[k], -loads[k]))
        if hashes and matches[best] / len(hashes) > self.cache_threshold:
            return Decision(ok[best], "cache-hit")
        smallest = min(range(len(ok)), key=lambda k: (len(self._cache(instances[ok[k]].name)), loads[k]))
        return Decision(ok[smallest], "smallest-tree")

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        name = instances[index].name
        claim: list[int] = []
        self._cache(name).insert(request.block_hashes, claim)
        if claim:
            self._claims[request.request_id] = (name, claim)

    def _settle(self, request_id: str, prefilled: bool) -> None:
        entry = self._claims.pop(request_id, None)
        if entry is not None:
            cache = self._cache(entry[0])
            (cache.confirm if prefilled else cache.retract)(entry[1])

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        if ttft_s is not None:   # a first token came back: the worker prefilled the prompt
            self._settle(request_id, True)

    def on_complete(self, request: RequestView, outcome: Outcome) -> None:
        self._settle(request.request_id, outcome.prefilled)
