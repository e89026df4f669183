"""Paged KV blocks with automatic prefix caching, after vLLM's block pool.

A block is computed KV for `block_size` tokens. Full prompt blocks are registered under their
chained hash once computed, so a later request with the same prefix reuses them. Blocks whose
last user finished stay cached but become *evictable*; they are reused least-recently-freed
first, and a request's blocks are freed tail-first so that a shared head outlives its tails.
"""

from __future__ import annotations

from collections import OrderedDict

NO_HASH = -1


class BlockPool:
    __slots__ = ("_evictable", "_free", "block_hash", "cached", "events", "num_blocks", "record_events",
                 "refcount")

    def __init__(self, num_blocks: int, record_events: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError("a KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-hashed blocks; pop() is LIFO
        self._evictable: OrderedDict[int, None] = OrderedDict()      # hashed, unreferenced; LRU first
        self.refcount = [0] * num_blocks
        self.block_hash = [NO_HASH] * num_blocks
        self.cached: dict[int, int] = {}                             # block hash → block id
        self.record_events = record_events
        # ("stored", [hashes]) / ("removed", [hashes]) in order, for vLLM-style KV events.
        self.events: list[tuple[str, list[int]]] = []

    # -- capacity --------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        """Blocks an allocation can take now: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by running requests (what vLLM reports as KV cache usage)."""
        return self.num_blocks - len(self._free) - len(self._evictable)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    # -- prefix cache ------------------------------------------------------------------------
    def match_prefix(self, hashes: list[int], limit: int) -> list[int]:
        """Block ids of the longest cached prefix of `hashes`, at most `limit` blocks; takes no refs."""
        out: list[int] = []
        cached = self.cached
        for h in hashes[:limit]:
            block = cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def evictable_among(self, blocks: list[int]) -> int:
        """How many of `blocks` are currently evictable (and so count in `num_available`)."""
        evictable = self._evictable
        return sum(1 for b in blocks if b in evictable)

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks a request reuses."""
        refcount, evictable = self.refcount, self._evictable
        for b in blocks:
            if refcount[b] == 0:
                evictable.pop(b, None)
            refcount[b] += 1

    def register(self, block: int, block_hash: int) -> None:
        """Record a just-computed full block under its hash (first writer wins, as in vLLM)."""
        if block_hash in self.cached or self.block_hash[block] != NO_HASH:
            return
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        if self.record_events:
            self.events.append(("stored", [block_hash]))

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks with one reference each; evicts LRU cached blocks when needed.
        The caller checks `num_available` first."""
        if n > self.num_available:
            raise RuntimeError(f"allocate({n}) with only {self.num_available} blocks available")
        out: list[int] = []
        free, refcount = self._free, self.refcount
        removed: list[int] = []
        for _ in range(n):
            if free:
                b = free.pop()
            else:
                b, _unused = self._evictable.popitem(last=False)
                h = self.block_hash[b]
                del self.cached[h]
                self.block_hash[b] = NO_HASH
                removed.append(h)
            refcount[b] = 1
            out.append(b)
        if removed and self.record_events:
            self.events.append(("removed", removed))
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each block, tail first; unreferenced hashed blocks stay cached."""
        refcount, block_hash, evictable, free = self.refcount, self.block_hash, self._evictable, self._free
        for b in reversed(blocks):
            refcount[b] -= 1
            if refcount[b] == 0:
                if block_hash[b] == NO_HASH:
                    free.append(b)
                else:
                    evictable[b] = None

    def clear(self) -> None:
        """Drop every unreferenced cached block (vLLM's reset_prefix_cache)."""
        for b in list(self._evictable):
            del self.cached[self.block_hash[b]]
            self.block_hash[b] = NO_HASH
            self._free.append(b)
        self._evictable.clear()
        if self.record_events:
            self.events.append(("cleared", []))
