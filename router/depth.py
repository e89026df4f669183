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


class RecentPaths:
    """How many of the last `window` requests passed through each prefix hash (both keyings
    decide what is hot from it)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.counts: dict[int, int] = {}
        self._paths: deque[tuple[int, ...]] = deque()

    def __len__(self) -> int:
        return len(self._paths)

    def add(self, path: tuple[int, ...]) -> list[tuple[int, int]]:
        """Count one request's path; returns (hash, count left) for the path that left the window."""
        # Plain dict arithmetic, not Counter.update/subtract: this runs on every request, and
        # Counter's Python-level type checks cost more than the counting.
        counts = self.counts
        for h in path:
            counts[h] = counts.get(h, 0) + 1
        paths = self._paths
        paths.append(path)
        if len(paths) <= self.window:
            return []
        left_window = []
        for h in paths.popleft():
            left = counts[h] - 1
            if left > 0:
                counts[h] = left
            else:
                del counts[h]
            left_window.append((h, left))
        return left_window


class AdaptiveDepth:
    def __init__(self, base_depth: int, *, window: int = 1000, expand_share: float = 0.06,
                 shrink_share: float = 0.02, max_extra: int = 8) -> None:
        self.base = max(1, base_depth)
        self.window = window
        self.expand_share = expand_share
        self.shrink_share = shrink_share
        self.max_extra = max_extra
        self.hot: set[int] = set()                   # prefix hashes whose key is extended
        self._recent = RecentPaths(window)

    def key(self, hashes: list[int]) -> tuple[int, int]:
        """(affinity key, depth used) for a prompt's block hashes, and count it in the window."""
        if not hashes:
            raise ValueError("adaptive depth needs at least one block hash")
        d, limit = self._depth(hashes)
        path = tuple(hashes[self.base - 1 : d]) if d >= self.base else (hashes[d - 1],)
        self._observe(path)
        key = hashes[d - 1]
        if d < limit and self._recent.counts[key] > self.expand_share * self.window:
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
        floor = self.shrink_share * self.window
        for h, left in self._recent.add(path):
            if left < floor:
                self.hot.discard(h)


def common_depth(a: list[int], b: list[int]) -> int:
    """Leading blocks two chained-hash lists share. Chained hashes are equal at i only if
    equal before i, so a binary search finds the end: O(log n) on a 12k-token prompt."""
    lo, hi = 0, min(len(a), len(b))   # invariant: a[:lo] == b[:lo]; a[hi] != b[hi] or hi = end
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class SplitDepth:
    """Affinity keys at the first block that is not a hot shared prefix.

    A prefix is hot when more than `hot_share` of the last `window` requests pass through it:
    more demand than its two ring candidates can serve (`hot_share` ≈ one instance's fair share,
    set from the member count by the policy). A hot prefix's requests are keyed past it, at
    the first block where they diverge (found as the common depth of its requests seen so far,
    binary-searched on chained hashes), so a hot tenant's 12k-token tool prompt splits by
    session in one step, not one block per window, and the hot prefix is replicated wherever
    its sessions land. A cold prefix keeps its key: all its requests stay on one pair. The key of
    a conversation stays the same turn after turn (its first private block), where a fixed-depth
    key of a prompt shorter than the depth moves as the prompt grows.

    Deterministic given the traffic: router replicas seeing the same mix of traffic (any share
    of it) mark the same prefixes hot, with no shared state; they may differ for a while on a
    prefix right at the threshold.
    """

    def __init__(self, base_depth: int = 1, *, window: int = 1000, hot_share: float = 0.125,
                 cool_share: float | None = None, warmup: int = 100) -> None:
        self.base = max(1, base_depth)
        self.warmup = warmup
        self.window = window
        self.hot_share = hot_share
        self.cool_share = cool_share          # None: half of hot_share
        self.hot: dict[int, int] = {}         # hot prefix hash → depth its requests share
        self._recent = RecentPaths(window)
        self._common: dict[int, tuple[list[int], int]] = {}   # key → (a prompt through it, common depth)
        # The last `peek`: (its hashes, depth, hot path). The router peeks a prompt (the handover's
        # hot-prefix tracking) just before it keys the same prompt; only `key` changes `hot`, and
        # it clears this, so a `key` right after a `peek` of the same list reuses the walk.
        self._peeked: tuple[list[int], int, list[int]] | None = None

    def _depth(self, hashes: list[int]) -> tuple[int, list[int]]:
        peeked = self._peeked
        if peeked is not None and peeked[0] is hashes:
            return peeked[1], peeked[2]
        n = len(hashes)
        d = min(self.base, n)
        path: list[int] = []
        hot = self.hot
        while d < n:
            split = hot.get(hashes[d - 1])
            if split is None:
                break
            path.append(hashes[d - 1])
            d = min(n, max(d + 1, split + 1))
        return d, path

    def key(self, hashes: list[int]) -> tuple[int, int]:
        """(affinity key, depth used) for a prompt's block hashes, and count it in the window."""
        if not hashes:
            raise ValueError("split depth needs at least one block hash")
        d, path = self._depth(hashes)
        self._peeked = None   # `hot` may change below
        key = hashes[d - 1]
        if key in self.hot:
            self._observe((*path,))
            return key & _MASK64, d      # a hot prefix the prompt ends inside: nothing to split by
        self._observe((*path, key))
        seen = self._common.get(key)
        if seen is None:
            self._common[key] = (hashes, len(hashes))
        else:
            ref, common = seen
            if common > d:
                common = max(d, min(common, common_depth(ref, hashes)))
                self._common[key] = (ref, common)
            # Share of the window, or of what has been seen while it fills (at least `warmup`
            # requests): a hot tenant is split within the first hundred or so requests, not after
            # `window` of them have all landed on one pair.
            if self._recent.counts[key] > self.hot_share * max(len(self._recent), self.warmup):
                self.hot[key] = common
        return key & _MASK64, d

    def peek(self, hashes: list[int]) -> tuple[int, int]:
        """What `key` would answer now, without counting the request."""
        if not hashes:
            raise ValueError("split depth needs at least one block hash")
        d, path = self._depth(hashes)
        self._peeked = (hashes, d, path)
        return hashes[d - 1] & _MASK64, d

    def _observe(self, path: tuple[int, ...]) -> None:
        floor = (self.hot_share / 2 if self.cool_share is None else self.cool_share) * self.window
        for h, left in self._recent.add(path):
            if left <= 0:
                self._common.pop(h, None)
            if left < floor:
                self.hot.pop(h, None)
