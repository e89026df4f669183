"""What the router believes about each instance: its cache contents and its prefill backlog.

Several policies need the same two estimates, kept from what the router itself dispatched:
- a shadow LRU of the prompt blocks sent to each instance (a stand-in for its prefix cache
  until vLLM KV events replace it), giving the expected cache hit of a new request there;
- the uncached prompt tokens dispatched there whose first token has not come back, times a
  per-token prefill time calibrated online from observed TTFTs, giving a predicted TTFT.
- with a KV store every instance loads from (`PolicyContext.shared_store`: vLLM engines on
  kvpilot's Redis connector), one more LRU of every prompt sent anywhere: at an instance that
  lacks a stored prefix, its tokens cost `store_token_cost` of a prefill token each (a load).

The calibration fits TTFT = fixed overhead + per-token time × work (exponentially weighted least
squares per instance), not TTFT / work: a measured TTFT also holds costs that do not grow with
the prompt (HTTP, the engine's scheduling step, a decode step the prefill rides along with). Charged
to the per-token time, a 5 ms overhead on a mostly-cached 100-token request reads as 50 µs/token,
every prediction after it is many times too high, and DualMap takes SLO fallbacks at light load.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence

from kvpilot.router.policy import BasePolicy, CacheView, InstanceLoad, Outcome, PolicyContext, RequestView

STORE_INSTANCES = 16   # the shared store's view holds this many instances' KV capacity (Redis is sized larger)
EXACT = 1 << 30        # as a ladder's `dense` (and a cache's `max_blocks`): every block is tracked

__all__ = ["EXACT", "CacheView", "LoadEstimator", "ShadowCache", "ladder"]


@functools.lru_cache(maxsize=512)
def ladder(n: int, dense: int = 8) -> tuple[int, ...]:
    """Block positions the shadow cache tracks for an n-block prompt: every block of the first
    `dense`, then every 2nd up to 2·dense, every 4th up to 4·dense, … and always the last. Chained
    hashes make a hit on block i imply hits on all before it, so this bounds the work per
    request by O(dense · log n) while the hit estimate stays within 1/dense of the truth. The
    default 8 tracks 24 positions of a 128-block prompt (16 gave 40): routing quality was the same
    within the benchmark's noise (bench/results/router_decision.md), and every position costs a
    lookup in a cache that, at 1,000 instances, no longer fits in the CPU's."""
    out: list[int] = []
    step, limit = 1, dense
    for i in range(n):
        while i >= limit:
            step, limit = step * 2, limit * 2
        if i % step == step - 1:
            out.append(i)
    if n and (not out or out[-1] != n - 1):
        out.append(n - 1)
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _tail_first(n: int, dense: int) -> tuple[tuple[int, int], ...]:
    """`ladder(n, dense)`'s positions last to first, each with the blocks it stands for (the gap
    back to the previous position; the first stands for itself): the order `insert` walks."""
    steps = ladder(n, dense)
    return tuple((steps[j], steps[j] - steps[j - 1] if j else 1) for j in range(len(steps) - 1, -1, -1))


class ShadowCache:
    """An LRU set of block hashes the router believes an instance holds.

    A request's blocks are inserted tail first, so its head is the most recent and is evicted
    last, as in the engine; cached blocks then form a prefix of each prompt, and `match` can
    binary-search for the end of it. Only the `ladder` positions of the first `max_blocks`
    blocks are tracked, which keeps a decision's cost nearly flat in prompt length.

    A prompt inserted with `pin` stays until `unpin` (its request ended), as vLLM evicts only
    blocks no running request holds: where requests run longer than the LRU takes to turn over
    (Mooncake's 15k-token prompts decode for a minute), an unpinned shadow forgot prefixes the
    engine still held, and the next turn was placed away from them (bench/results/ray_virtual.md,
    session 15).
    """

    __slots__ = ("_blocks", "_last", "_pending", "_pins", "capacity", "dense", "max_blocks", "size")

    def __init__(self, capacity_blocks: int, max_blocks: int = 1 << 16, dense: int = 8) -> None:
        self.capacity = max(1, capacity_blocks)
        self.max_blocks = max_blocks
        self.dense = dense
        self._blocks: OrderedDict[int, int] = OrderedDict()  # hash → blocks it stands for
        self.size = 0                                        # blocks represented, against capacity
        # The last prompt matched and its matched ladder positions: a decision matches both
        # candidates, then the chosen one again when it dispatches; nothing changes in between.
        self._last: tuple[list[int] | None, int] = (None, 0)
        # Blocks held only on the word of dispatches not yet seen to prefill: hash → how many rely on it.
        self._pending: dict[int, int] = {}
        self._pins: dict[int, int] = {}   # hash → running requests holding it (not evictable)

    def __len__(self) -> int:
        return self.size

    def _present(self, hashes: list[int], steps: tuple[int, ...], known: int = 0) -> int:
        """How many leading ladder positions are cached (they form a prefix: binary search);
        `known`: how many are already known to be."""
        last, present = self._last
        if hashes is last:
            return present
        blocks = self._blocks
        if not known:
            # Probe the first block alone first: an instance that has never seen this prefix
            # answers in one lookup instead of a full binary search.
            if not steps or hashes[steps[0]] not in blocks:
                self._last = (hashes, 0)
                return 0
            known = 1
        lo, hi = known, len(steps)  # invariant: steps[:lo] cached, steps[hi:] not
        while lo < hi:
            mid = (lo + hi) // 2
            if hashes[steps[mid]] in blocks:
                lo = mid + 1
            else:
                hi = mid
        self._last = (hashes, lo)
        return lo

    def positions(self, hashes: list[int]) -> tuple[tuple[int, ...], int]:
        """The prompt's ladder, and how many of its leading positions are cached."""
        steps = ladder(min(len(hashes), self.max_blocks), self.dense)
        return steps, self._present(hashes, steps)

    def holds_more(self, hashes: list[int], steps: tuple[int, ...], lo: int) -> bool:
        """Whether more than the first `lo` ladder positions are cached here: one probe, since
        cached positions form a prefix. When they are, the rest of the match starts from there."""
        if lo >= len(steps) or hashes[steps[lo]] not in self._blocks:
            return False
        self._present(hashes, steps, lo + 1)
        return True

    def match(self, hashes: list[int]) -> int:
        """Leading blocks of `hashes` believed cached (to the precision of the ladder)."""
        steps = ladder(min(len(hashes), self.max_blocks), self.dense)
        lo = self._present(hashes, steps)
        return steps[lo - 1] + 1 if lo else 0

    def insert(self, hashes: list[int], claim: list[int] | None = None, pin: bool = False) -> None:
        """Record a prompt sent here. With `claim`, the insert is tentative until `confirm`: the
        blocks this prompt added, and those it found still tentative, are appended to `claim`, and
        `retract(claim)` takes out whichever of them no confirmed dispatch has since vouched for.
        With `pin`, its blocks are not evicted until `unpin(hashes)`.
        (Every dispatch runs this: positions and weights come precomputed, tail first.)"""
        self._last = (None, 0)
        blocks = self._blocks
        pending = self._pending
        pins = self._pins
        size = self.size
        for i, weight in _tail_first(min(len(hashes), self.max_blocks), self.dense):
            h = hashes[i]
            if pin:
                pins[h] = pins.get(h, 0) + 1
            if h in blocks:
                blocks.move_to_end(h)
                if claim is not None and pending and h in pending:
                    pending[h] += 1
                    claim.append(h)
            else:
                blocks[h] = weight
                size += weight
                if claim is not None:
                    pending[h] = pending.get(h, 0) + 1   # (a stale count if it was evicted while pending)
                    claim.append(h)
        capacity = self.capacity
        skips = len(pins)   # each pinned block is passed over once: then every block left is pinned
        while size > capacity:
            h, weight = blocks.popitem(last=False)
            if h in pins:
                blocks[h] = weight   # held by a running request: to the back, as if just used
                if not skips:
                    break   # all pinned: the engine would preempt a request, not drop its blocks
                skips -= 1
                continue
            size -= weight
        self.size = size

    def unpin(self, hashes: list[int]) -> None:
        """The request pinned with `hashes` ended: its blocks become evictable, most recent first,
        as vLLM returns a finished request's blocks to the free queue (tail first)."""
        pins, blocks = self._pins, self._blocks
        for i, _ in _tail_first(min(len(hashes), self.max_blocks), self.dense):
            h = hashes[i]
            n = pins.get(h)
            if n is None:
                continue
            if n > 1:
                pins[h] = n - 1
                continue
            del pins[h]
            if h in blocks:
                blocks.move_to_end(h)

    def confirm(self, claim: list[int]) -> None:
        """The claiming dispatch was prefilled: its blocks are really cached there."""
        pending = self._pending
        for h in claim:
            pending.pop(h, None)

    def retract(self, claim: list[int]) -> None:
        """The claiming dispatch never ran its prefill: blocks that only it, or other unconfirmed
        dispatches that have all failed, vouched for leave the cache."""
        if not claim:
            return
        self._last = (None, 0)
        pending, blocks = self._pending, self._blocks
        for h in claim:
            n = pending.get(h)
            if n is None:
                continue   # confirmed by another dispatch meanwhile
            if n > 1:
                pending[h] = n - 1
                continue
            del pending[h]
            weight = blocks.pop(h, None)
            if weight is not None:
                self.size -= weight


class LoadEstimator:
    """Per-instance shadow caches, prefill backlogs and per-token prefill times, keyed by name
    (so an instance keeps its history when the list order or membership changes).

    Work is counted in token-equivalents: a prefill of `u` new tokens after `c` cached ones costs
    u · (1 + (c + u/2) / attention_tokens), the linear layers plus causal attention over the
    context. `attention_tokens` is the context length at which attention costs as much per token
    as the linear layers (≈ 20k for an 8B model on an H100; 0 turns the term off). Without it one
    per-token time cannot fit both a 2k and an 80k prompt: the long one costs 3× more per token,
    and an online average over a mix of both mispredicts every request."""

    def __init__(self, context: PolicyContext, prefill_token_s: float | None = None, ewma: float = 0.1,
                 attention_tokens: int = 20_000, shadow_dense: int = 8, pin_running: bool = False) -> None:
        self.context = context
        self.shadow_dense = shadow_dense   # the shadow caches' ladder (`EXACT`: every block)
        # A dispatched prompt's blocks stay in its shadow cache until the request ends (`ShadowCache.unpin`).
        self.pin_running = pin_running
        self._pinned: dict[str, tuple[str, list[int]]] = {}      # request → (instance, its block hashes)
        self.initial_token_s = prefill_token_s or context.prefill_token_s
        self.ewma = ewma
        self.attention_tokens = attention_tokens
        self.caches: dict[str, ShadowCache] = {}
        self.token_s: dict[str, float] = {}
        self.overhead_s: dict[str, float] = {}                    # the fitted fixed part of a TTFT
        self._fit: dict[str, list[float]] = {}                    # weighted [n, Σx, Σy, Σx², Σxy]
        self.backlog: dict[str, int] = {}                         # uncached tokens not yet prefilled
        self._inflight: dict[str, tuple[str, int, int]] = {}      # request → (instance, uncached, backlog seen)
        self._claims: dict[str, tuple[str, list[int]]] = {}       # request → (instance, its tentative blocks)
        self.observed: CacheView | None = None                    # set by the proxy when KV events are on
        # With a shared store (`PolicyContext.shared_store`): the prefixes any instance was sent,
        # which it computed and saved; another instance loads them instead of prefilling.
        self.store: ShadowCache | None = None
        if context.shared_store:
            self.store = ShadowCache(STORE_INSTANCES * context.kv_capacity_tokens // context.block_size)
        # Each instance's load view (other router replicas' waiting requests: `external`), and this
        # replica's mean prefill work per dispatched request, the price of one of theirs.
        self.loads: dict[str, InstanceLoad] = {}
        self.mean_work = 0.0
        self.mean_prompt = 0.0

    def track(self, instances: Sequence[InstanceLoad]) -> None:
        capacity = self.context.kv_capacity_tokens // self.context.block_size
        loads = self.loads
        for inst in instances:
            if loads.get(inst.name) is not inst:
                loads[inst.name] = inst
            if inst.name not in self.caches:
                self.caches[inst.name] = ShadowCache(capacity, max(1 << 16, self.shadow_dense), self.shadow_dense)
                self.token_s[inst.name] = self.initial_token_s
                self.overhead_s[inst.name] = 0.0
                # The prior as two pseudo-observations (no overhead), forgotten as real ones arrive.
                x1, x2, t = 1024.0, 8192.0, self.initial_token_s
                self._fit[inst.name] = [2.0, x1 + x2, t * (x1 + x2), x1 * x1 + x2 * x2, t * (x1 * x1 + x2 * x2)]
                self.backlog[inst.name] = 0

    def cached_tokens(self, name: str, request: RequestView) -> int:
        """Leading prompt tokens `name` is expected to hold (observed from KV events where the
        router follows them, else the shadow cache's guess)."""
        seen = self.observed.cached_tokens(name, request) if self.observed is not None else None
        return self.caches[name].match(request.block_hashes) * self.context.block_size if seen is None else seen

    def uncached(self, name: str, request: RequestView) -> int:
        """Prefill work of `request` at `name` in token-equivalents, after its expected cache hit."""
        return self._work_after(request, self.cached_tokens(name, request))

    def _work_after(self, request: RequestView, cached: int) -> int:
        hit = min(request.prompt_tokens - 1, cached)
        load = 0
        if self.store is not None:   # tokens in the store beyond the local hit: loaded, at a fraction of a prefill
            stored = min(request.prompt_tokens - 1, self.store.match(request.block_hashes) * self.context.block_size)
            if stored > hit:
                load = math.ceil((stored - hit) * self.context.store_token_cost)
                hit = stored
        return self.prefill_work(request.prompt_tokens, hit) + load

    def prefill_work(self, prompt_tokens: int, hit: int) -> int:
        """Token-equivalents to prefill a prompt of which `hit` tokens are cached: its new tokens,
        each also attending to those before it (`attention_tokens` of them cost one token more)."""
        new = max(1, prompt_tokens - hit)
        if self.attention_tokens <= 0:
            return new
        return new + new * (hit + new // 2) // self.attention_tokens

    def better_of(self, a: str, b: str, request: RequestView) -> tuple[str, str, int]:
        """(the candidate with the larger expected cache hit, `a` on a tie; the other; the prefill
        work at the first). Fewer uncached tokens is the same order as a longer hit, so matching
        `a` and one probe of `b` where `a`'s hit ends decide it: `b` is matched in full only when
        it wins, which keeps a decision's lookups from doubling with the prompt's ladder."""
        if self.observed is not None or a == b or self.store is not None:
            ua, ub = self.uncached(a, request), self.uncached(b, request)
            return (a, b, ua) if ua <= ub else (b, a, ub)
        hashes = request.block_hashes
        steps, lo = self.caches[a].positions(hashes)
        if self.caches[b].holds_more(hashes, steps, lo):
            return b, a, self.uncached(b, request)
        return a, b, self.uncached(a, request)

    # -- CacheEstimate: what consumers outside the policy may ask and tell ----------------------------
    def cached_blocks(self, name: str, block_hashes: list[int]) -> int:
        cache = self.caches.get(name)
        return 0 if cache is None else cache.match(block_hashes)

    def learn(self, name: str, block_hashes: list[int]) -> None:
        self.track([InstanceLoad(name)])
        self.caches[name].insert(block_hashes)

    def prefill_s(self, request_id: str) -> float:
        entry = self._inflight.get(request_id)
        return 0.0 if entry is None else self.token_s[entry[0]] * entry[1]

    def follow(self, observed: CacheView) -> None:
        self.observed = observed

    def external(self, name: str) -> int:
        """Prefill work (token-equivalents) other router replicas have waiting at `name`, as the
        last engine poll showed it (`kvpilot.router.engine_load`): 0 with one replica."""
        load = self.loads.get(name)
        if load is None:
            return 0
        if load.peer_prompt_tokens is not None:   # the engine says how big: price it per token
            return int(load.peer_prompt_tokens * self.mean_work / self.mean_prompt) if self.mean_prompt else 0
        return int(load.peer_waiting * self.mean_work) if load.peer_waiting else 0

    def ahead(self, name: str) -> int:
        """All prefill work ahead of a new request at `name`: this replica's backlog and its peers'."""
        return self.backlog[name] + self.external(name)

    def predicted_ttft(self, name: str, uncached: int) -> float:
        return self.token_s[name] * (self.ahead(name) + uncached)

    def dispatched(self, request: RequestView, name: str) -> int:
        """Count a dispatch in `name`'s backlog and shadow cache; returns the prompt tokens it was
        expected to hold there before this request."""
        cached = self.cached_tokens(name, request)
        uncached = self._work_after(request, cached)
        self.mean_work += self.ewma * (uncached - self.mean_work) if self.mean_work else uncached
        tokens = request.prompt_tokens
        self.mean_prompt += self.ewma * (tokens - self.mean_prompt) if self.mean_prompt else tokens
        self.backlog[name] += uncached
        seen = self.ahead(name)   # the work this request waits behind and its own: what its TTFT measures
        self._inflight[request.request_id] = (name, uncached, seen)
        claim: list[int] = []
        self.caches[name].insert(request.block_hashes, claim, pin=self.pin_running)
        if self.pin_running:
            self._pinned[request.request_id] = (name, request.block_hashes)
        if self.store is not None:
            self.store.insert(request.block_hashes)
        if claim:
            self._claims[request.request_id] = (name, claim)
        return cached

    def completed(self, request_id: str, prefilled: bool) -> None:
        """A dispatch ended: its prompt stays in the shadow cache only if the instance prefilled it."""
        entry = self._claims.pop(request_id, None)
        if entry is not None:
            name, claim = entry
            cache = self.caches.get(name)
            if cache is not None:
                (cache.confirm if prefilled else cache.retract)(claim)

    def ended(self, request_id: str, prefilled: bool) -> None:
        """The request is over (done, failed or never run there): its blocks become evictable."""
        pinned = self._pinned.pop(request_id, None)
        if pinned is not None:
            cache = self.caches.get(pinned[0])
            if cache is not None:
                cache.unpin(pinned[1])
        self.completed(request_id, prefilled)

    def first_token(self, request_id: str, ttft_s: float | None) -> None:
        if ttft_s is not None:
            self.completed(request_id, True)   # a first token: the prompt was prefilled there
        entry = self._inflight.pop(request_id, None)
        if entry is None:
            return
        name, uncached, seen = entry
        self.backlog[name] = max(0, self.backlog[name] - uncached)
        if ttft_s is not None:
            # Calibrate the per-token prefill time from what this request actually waited for.
            self.calibrate(name, max(1, seen), ttft_s)

    def calibrate(self, name: str, work: float, ttft_s: float) -> None:
        """One observation: `ttft_s` after `work` token-equivalents (backlog at dispatch + own)."""
        keep = 1.0 - self.ewma
        n, sx, sy, sxx, sxy = (v * keep for v in self._fit[name])
        n, sx, sy, sxx, sxy = n + 1, sx + work, sy + ttft_s, sxx + work * work, sxy + work * ttft_s
        self._fit[name] = [n, sx, sy, sxx, sxy]
        mx, my = sx / n, sy / n
        var = sxx / n - mx * mx
        if var > (0.1 * mx) ** 2:   # sizes spread enough to tell the fixed part from the slope
            slope = (sxy / n - mx * my) / var
            if slope > 0:
                overhead = my - slope * mx
                if overhead < 0:     # noise: fit through the origin instead
                    slope, overhead = sxy / sxx, 0.0
                self.token_s[name], self.overhead_s[name] = slope, overhead
                return
        # Too little spread to separate them: the per-token time explains what the overhead does not
        # (an overhead larger than this whole TTFT was overestimated: halve it down to it).
        overhead = self.overhead_s[name] = min(self.overhead_s[name], ttft_s / 2)
        per_token = (ttft_s - overhead) / work
        self.token_s[name] += self.ewma * (per_token - self.token_s[name])


class EstimatingPolicy(BasePolicy):
    """A policy that steers by a `LoadEstimator` (DualMap, min-TTFT): the router's feedback is what
    keeps the estimate true, so every dispatch, first token and completion goes to it."""

    estimate: LoadEstimator

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        self.estimate.dispatched(request, instances[index].name)

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        self.estimate.first_token(request_id, ttft_s)

    def on_complete(self, request: RequestView, outcome: Outcome) -> None:
        self.estimate.ended(request.request_id, outcome.prefilled)

    def cache_estimate(self) -> LoadEstimator:
        return self.estimate
