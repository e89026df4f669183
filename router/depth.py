"""Adaptive affinity-key depth: a hot prefix gets a longer key, so its traffic spreads.

With a fixed depth, every request behind one popular prefix (a shared system prompt, a viral
document) has the same key and lands on the same two candidates however hot it gets. Here the
key of a prefix whose share of recent requests passes `expand_share` is extended by one block,
splitting its traffic by what follows; when that prefix's share falls below `shrink_share` the
extension is dropped, and requests regroup on fewer instances (more cache reuse).
"""

from __future__ import annotations

from collections import deque

_MASK64 = (1 << 64) - 1


class AdaptiveDepth:
    def __init__(self, base_depth: int, *, window: int = 1000, expand_share: float = 0.06,
                 shrink_share: float = 0.02, max_extra: int = 8) -> None:
        self.base = max(1, base_depth)
        self.window = window
        self.expand_share = expand_share
        self.shrink_share = shrink_share
        self.max_extra = max_extra
        self.hot: set[int] = set()                   # prefix hashes whose key is extended
        self._recent: deque[tuple[int, ...]] = deque()
        self._counts: dict[int, int] = {}           # how many recent requests passed each prefix

    def key(self, hashes: list[int]) -> tuple[int, int]:
        """(affinity key, depth used) for a prompt's block hashes, and count it in the window."""
        if not hashes:
            raise ValueError("adaptive depth needs at least one block hash")
        d, limit = self._depth(hashes)
        path = tuple(hashes[self.base - 1 : d]) if d >= self.base else (hashes[d - 1],)
        self._observe(path)
        key = hashes[d - 1]
        if d < limit and self._counts[key] > self.expand_share * self.window:
            self.hot.add(key)
        return key & _MASK64, d

    def peek(self, hashes: list[int]) -> tuple[int, int]:
        """What `key` would answer now, without counting the request (the router's handover
        asks which key a prompt maps to)."""
        if not hashes:
            raise ValueError("adaptive depth needs at least one block hash")
        d = self._depth(hashes)[0]
        return hashes[d - 1] & _MASK64, d

    def _depth(self, hashes: list[int]) -> tuple[int, int]:
        d = min(self.base, len(hashes))
        limit = min(len(hashes), self.base + self.max_extra)
        while d < limit and hashes[d - 1] in self.hot:
            d += 1
        return d, limit

    def _observe(self, path: tuple[int, ...]) -> None:
        # Plain dict arithmetic, not Counter.update/subtract: this runs on every request, and
        # Counter's Python-level type checks cost more than the counting.
        counts = self._counts
        for h in path:
            counts[h] = counts.get(h, 0) + 1
        recent = self._recent
        recent.append(path)
        if len(recent) > self.window:
            hot, floor = self.hot, self.shrink_share * self.window
            for h in recent.popleft():
                left = counts[h] - 1
                if left > 0:
                    counts[h] = left
                else:
                    del counts[h]
                if h in hot and left < floor:
                    hot.discard(h)
