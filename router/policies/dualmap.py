"""DualMap (first cut): dual-hash affinity with power-of-two choices and an SLO-aware switch.

Each request's affinity key is the chained hash of its first `key_tokens` prompt tokens (in
whole blocks), so prompts sharing that prefix share a key; the key must reach past a prompt head
that every request shares (a global system prompt), or all traffic lands on one pair. Two
independent rings map the key to two distinct candidates.
The router estimates, per candidate, the cache hit (a shadow LRU of the blocks it sent there)
and the TTFT it would see (per-token prefill time × the uncached tokens dispatched there and not
yet prefilled, plus this request's own). It takes the candidate with the larger hit unless that
one's predicted TTFT exceeds θ × SLO, in which case it takes the faster of the two.

Not yet here (see the router issue): adaptive key depth for hot prefixes, router-side queues
with late binding, hotspot rebalancing of queued requests, and KV-event-driven cache state.
Paper: DualMap, arXiv 2602.06502 (read, not copied).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvpilot.router.hashring import DualRing
from kvpilot.router.policy import BasePolicy, Decision, InstanceLoad, PolicyContext, RequestView


class ShadowCache:
    """An LRU set of block hashes the router believes an instance holds."""

    __slots__ = ("_blocks", "capacity")

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(1, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: list[int]) -> int:
        """Leading blocks of `hashes` believed cached."""
        n = 0
        blocks = self._blocks
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, hashes: list[int]) -> None:
        blocks = self._blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


class DualMap(BasePolicy):
    name = "dualmap"

    def __init__(self, context: PolicyContext | None = None, *, key_tokens: int = 1024, theta: float = 0.5,
                 vnodes: int = 128, prefill_token_s: float = 30e-6, ewma: float = 0.1) -> None:
        super().__init__(context)
        self.depth = max(1, key_tokens // self.context.block_size)
        self.theta = theta
        self.vnodes = vnodes
        self.initial_token_s = prefill_token_s
        self.ewma = ewma
        self._names: tuple[str, ...] = ()
        self._index: dict[str, int] = {}
        self._ring = DualRing()
        self._caches: dict[str, ShadowCache] = {}
        self._token_s: dict[str, float] = {}
        self._backlog: dict[str, int] = {}                          # uncached tokens not yet prefilled
        self._inflight: dict[str, tuple[str, int, int]] = {}        # request → (instance, uncached, backlog seen)

    def _sync(self, instances: Sequence[InstanceLoad]) -> None:
        names = tuple(i.name for i in instances)
        if names == self._names:
            return
        for name in set(self._names) - set(names):
            self._ring.remove(name)
        capacity = self.context.kv_capacity_tokens // self.context.block_size
        for name in names:
            if name not in self._ring.members:
                self._ring.add(name)
            self._caches.setdefault(name, ShadowCache(capacity))
            self._token_s.setdefault(name, self.initial_token_s)
            self._backlog.setdefault(name, 0)
        self._names = names
        self._index = {name: i for i, name in enumerate(names)}

    def _key(self, request: RequestView) -> int:
        hashes = request.block_hashes
        if not hashes:  # shorter than one block: no reusable prefix, spread by id
            return hash(request.request_id) & ((1 << 64) - 1)
        return hashes[min(self.depth, len(hashes)) - 1] & ((1 << 64) - 1)

    def predicted_ttft(self, name: str, uncached: int) -> float:
        return self._token_s[name] * (self._backlog[name] + uncached)

    def _uncached(self, name: str, request: RequestView) -> int:
        hit = self._caches[name].match(request.block_hashes) * self.context.block_size
        return max(1, request.prompt_tokens - hit)

    def route(self, request: RequestView, instances: Sequence[InstanceLoad]) -> Decision:
        if not instances:
            raise LookupError("no instances to route to")
        self._sync(instances)
        c1, c2 = self._ring.candidates(self._key(request))
        u1, u2 = self._uncached(c1, request), self._uncached(c2, request)
        best, other, ub, uo = (c1, c2, u1, u2) if u1 <= u2 else (c2, c1, u2, u1)
        limit = self.theta * self.context.slo_ttft_s
        if self.predicted_ttft(best, ub) > limit and self.predicted_ttft(other, uo) < self.predicted_ttft(best, ub):
            return Decision(self._index[other], "slo-fallback")
        return Decision(self._index[best], "affinity")

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        name = instances[index].name
        uncached = self._uncached(name, request)
        backlog = self._backlog[name]
        self._backlog[name] = backlog + uncached
        self._inflight[request.request_id] = (name, uncached, backlog + uncached)
        self._caches[name].insert(request.block_hashes)

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        entry = self._inflight.pop(request_id, None)
        if entry is None:
            return
        name, uncached, seen = entry
        if name in self._backlog:
            self._backlog[name] = max(0, self._backlog[name] - uncached)
            if ttft_s is None:
                return
            # Calibrate the per-token prefill time from what this request actually waited for.
            sample = ttft_s / max(1, seen)
            self._token_s[name] += self.ewma * (sample - self._token_s[name])
