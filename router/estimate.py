"""What the router believes about each instance: its cache contents and its prefill backlog.

Several policies need the same two estimates, kept from what the router itself dispatched:
- a shadow LRU of the prompt blocks sent to each instance (a stand-in for its prefix cache
  until vLLM KV events replace it), giving the expected cache hit of a new request there;
- the uncached prompt tokens dispatched there whose first token has not come back, times a
  per-token prefill time calibrated online from observed TTFTs, giving a predicted TTFT.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvpilot.router.policy import InstanceLoad, PolicyContext, RequestView


class ShadowCache:
    """An LRU set of block hashes the router believes an instance holds."""

    __slots__ = ("_blocks", "capacity")

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(1, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

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


class LoadEstimator:
    """Per-instance shadow caches, prefill backlogs and per-token prefill times, keyed by name
    (so an instance keeps its history when the list order or membership changes)."""

    def __init__(self, context: PolicyContext, prefill_token_s: float = 30e-6, ewma: float = 0.1) -> None:
        self.context = context
        self.initial_token_s = prefill_token_s
        self.ewma = ewma
        self.caches: dict[str, ShadowCache] = {}
        self.token_s: dict[str, float] = {}
        self.backlog: dict[str, int] = {}                         # uncached tokens not yet prefilled
        self._inflight: dict[str, tuple[str, int, int]] = {}      # request → (instance, uncached, backlog seen)

    def track(self, instances: Sequence[InstanceLoad]) -> None:
        capacity = self.context.kv_capacity_tokens // self.context.block_size
        for inst in instances:
            if inst.name not in self.caches:
                self.caches[inst.name] = ShadowCache(capacity)
                self.token_s[inst.name] = self.initial_token_s
                self.backlog[inst.name] = 0

    def uncached(self, name: str, request: RequestView) -> int:
        hit = self.caches[name].match(request.block_hashes) * self.context.block_size
        return max(1, request.prompt_tokens - hit)

    def predicted_ttft(self, name: str, uncached: int) -> float:
        return self.token_s[name] * (self.backlog[name] + uncached)

    def dispatched(self, request: RequestView, name: str) -> None:
        uncached = self.uncached(name, request)
        seen = self.backlog[name] + uncached
        self.backlog[name] = seen
        self._inflight[request.request_id] = (name, uncached, seen)
        self.caches[name].insert(request.block_hashes)

    def first_token(self, request_id: str, ttft_s: float | None) -> None:
        entry = self._inflight.pop(request_id, None)
        if entry is None:
            return
        name, uncached, seen = entry
        self.backlog[name] = max(0, self.backlog[name] - uncached)
        if ttft_s is not None:
            # Calibrate the per-token prefill time from what this request actually waited for.
            self.token_s[name] += self.ewma * (ttft_s / max(1, seen) - self.token_s[name])
