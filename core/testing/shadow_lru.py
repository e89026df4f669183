"""The per-block shadow LRU that `kvpilot.router.estimate.ShadowCache` replaced, kept as the
reference its grouped LRU must equal (unit test) and as the baseline of bench/router_decision.py."""

from __future__ import annotations

from collections import OrderedDict

from kvpilot.router.estimate import ladder


class PerBlockLRU:
    """One OrderedDict entry per tracked block: Python work per tracked position on every insert."""

    def __init__(self, capacity_blocks: int, max_blocks: int = 1 << 16, dense: int = 16) -> None:
        self.capacity, self.max_blocks, self.dense = max(1, capacity_blocks), max_blocks, dense
        self._blocks: OrderedDict[int, int] = OrderedDict()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def match(self, hashes: list[int]) -> int:
        steps = ladder(min(len(hashes), self.max_blocks), self.dense)
        lo, hi = 0, len(steps)
        while lo < hi:
            mid = (lo + hi) // 2
            if hashes[steps[mid]] in self._blocks:
                lo = mid + 1
            else:
                hi = mid
        return steps[lo - 1] + 1 if lo else 0

    def insert(self, hashes: list[int]) -> None:
        blocks = self._blocks
        steps = ladder(min(len(hashes), self.max_blocks), self.dense)
        for j in range(len(steps) - 1, -1, -1):
            h = hashes[steps[j]]
            if h in blocks:
                blocks.move_to_end(h)
            else:
                weight = steps[j] - steps[j - 1] if j else 1
                blocks[h] = weight
                self.size += weight
        while self.size > self.capacity:
            self.size -= blocks.popitem(last=False)[1]
