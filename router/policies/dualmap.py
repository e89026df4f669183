"""DualMap: dual-hash affinity with power-of-two choices and an SLO-aware switch.

Each request's affinity key is the chained hash of its first `key_tokens` prompt tokens (in
whole blocks), so prompts sharing that prefix share a key; the key must reach past a prompt head
that every request shares (a global system prompt), or all traffic lands on one pair. Two
independent rings map the key to two distinct candidates. Per candidate the router estimates
the cache hit and the TTFT it would see (`LoadEstimator`). It takes the candidate with the
larger hit unless that one's predicted TTFT exceeds θ × SLO, in which case it takes the other if
that is faster even after paying for what the switch adds: the other must prefill the tokens
the first has cached, and that prefill also delays whatever reaches the other next, so the
switch is charged for it once more (`switch_cost`). Without the charge, a request switches to
save itself a little time while its whole cached prefix is computed again; where Serve queues
requests itself (`kvpilot.ray`, no router-side queues) that sent 7-35% of agentic and 43-45%
of chat requests away from their cached prefix (bench/results/ray_virtual.md). There, too, the
instance holding the longest cached prefix takes a request whose prefix is cached anywhere
(`follow_slos`, `follow_share`), and a new prefix is placed where the least has gone (`place_slos`).

Hot prefixes are keyed past their shared head (`SplitDepth`): a prefix that more than one
instance's fair share of requests pass through is split at the first block where its requests
diverge, so its demand spreads over as many instances as its distinct continuations reach, while
a cold prefix keeps its single pair. Requests wait in router-side queues ordered by
expected prefill work, are released while the instance's prefill backlog and KV budget allow,
move off hot spots while queued, and are taken over by idle instances (`HoldQueues`; the
virtual-time cluster and the live proxy's pools both drive it through `hold`/`release`). The
predicted TTFT for the switch counts only the queued work that would start first.
bench/results/routing_quality.md has what each part is worth. Where the router follows vLLM's
KV events (`kvEvents`), the cache hit comes from them (`kvpilot.router.kv_events`) instead of
the shadow cache.
Paper: DualMap, arXiv 2602.06502 (read, not copied).
"""

from __future__ import annotations

from collections.abc import Sequence, Set

from kvpilot.router.depth import AdaptiveDepth, SplitDepth
from kvpilot.router.estimate import EstimatingPolicy, LoadEstimator
from kvpilot.router.hashring import DualRing, Membership
from kvpilot.router.holding import Held, HoldQueues
from kvpilot.router.policy import (
    NOTHING,
    Decision,
    InstanceLoad,
    Outcome,
    PolicyContext,
    RequestView,
)

_MASK64 = (1 << 64) - 1


def affinity_key(request: RequestView, depth: int) -> int:
    """The chained hash of the first `depth` blocks; short prompts fall back to their id."""
    hashes = request.block_hashes
    if not hashes:
        return hash(request.request_id) & _MASK64
    return hashes[min(depth, len(hashes)) - 1] & _MASK64


class DualMap(EstimatingPolicy):
    name = "dualmap"

    def __init__(self, context: PolicyContext | None = None, *, key_tokens: int = 1024, theta: float = 0.5,
                 vnodes: int = 128, prefill_token_s: float | None = None, ewma: float = 0.1,
                 release_tokens: int = 8192, adaptive_depth: bool = True, steal: bool = True,
                 max_wait_slos: float | None = 2.0, attention_tokens: int = 20_000,
                 kv_high: float | None = 0.9, keying: str = "split", spread_share: float = 0.5,
                 split_base_tokens: int = 0, switch_cost: bool = True, shadow_dense: int = 8,
                 follow_slos: float | None = None, follow_share: float = 0.5,
                 place_slos: float | None = None, pin_running: bool = False) -> None:
        super().__init__(context)
        self.switch_cost = switch_cost
        # Off (None) in the proxy; inside Serve the longest cached prefix leads (`_in_serve`) and a
        # new prefix goes where the least has been placed (`_place`).
        self.follow_slos = follow_slos
        self.follow_share = follow_share
        self.place_slos = place_slos
        self._placed: dict[str, int] = {}   # prompt tokens sent to each instance that it did not hold
        self._placing: dict[str, tuple[str, int]] = {}   # request → (instance, its share of `_placed`) until it ends
        self.depth = max(1, key_tokens // self.context.block_size)
        # keying: "split" (hot prefixes keyed past their shared head), "extend" (the earlier
        # one-block-per-window extension of a fixed-depth key) or "fixed"; kept for ablations.
        self.spread_share = spread_share
        self.adaptive: AdaptiveDepth | SplitDepth | None = None
        if not adaptive_depth or keying == "fixed":
            self.adaptive = None
        elif keying == "extend":
            self.adaptive = AdaptiveDepth(self.depth)
        elif keying == "split":
            self.adaptive = SplitDepth(max(1, split_base_tokens // self.context.block_size))
        else:
            raise ValueError(f"unknown keying {keying!r}: split, extend or fixed")
        self.theta = theta
        self.estimate = LoadEstimator(self.context, prefill_token_s, ewma, attention_tokens, shadow_dense,
                                      pin_running)
        max_wait = None if max_wait_slos is None else (lambda: max_wait_slos * self.context.slo_ttft_s)
        self.holding = HoldQueues(self.estimate, lambda: self.theta * self.context.slo_ttft_s, release_tokens,
                                  max_wait_s=max_wait, steal=steal)
        self.kv_high = kv_high
        self._other: dict[str, str] = {}
        self._ring = DualRing(vnodes=vnodes)
        self._members = Membership(self._ring)
        self._rehome = False   # membership changed since the last release: held requests may be orphaned

    def _sync(self, instances: Sequence[InstanceLoad]) -> None:
        if self._members.sync(instances):
            self.estimate.track(instances)
            if isinstance(self.adaptive, SplitDepth):
                self.adaptive.hot_share = self.spread_share / max(1, len(instances))
            self._rehome = bool(self.holding.queues)

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        if not instances:
            raise LookupError("no instances to route to")
        self._sync(instances)
        if self.adaptive is not None and request.block_hashes:
            key = self.adaptive.key(request.block_hashes)[0]
        else:
            key = affinity_key(request, self.depth)
        a, b = self._ring.candidates(key, excluded)
        if self.follow_slos is None:
            pick, alt, reason = self._pair(request, *self.estimate.better_of(a, b, request))
        else:
            pick, alt, reason = self._in_serve(request, instances, excluded, a, b, self.follow_slos)
        self._other[request.request_id] = alt
        return Decision(self._members.index[pick], reason)

    def _pair(self, request: RequestView, best: str, other: str, ub: int,
              other_work: int | None = None) -> tuple[str, str, str]:
        """(pick, the other, reason) of the key's pair: the larger hit (`best`, `ub` its work), unless
        its predicted TTFT is past θ × SLO and the other's is shorter even with the switch's cost.
        The other's work (`other_work`, looked up when not given) matters only past the switch, so
        most decisions skip it."""
        wait = self.holding.wait_for
        t_best = wait(best, ub)
        if t_best > self.theta * self.context.slo_ttft_s:
            work = self.estimate.uncached(other, request) if other_work is None else other_work
            added = self.estimate.token_s[other] * max(0, work - ub) if self.switch_cost else 0.0
            if wait(other, work) + added < t_best:
                return other, best, "slo-fallback"
        return best, other, "affinity"

    def _in_serve(self, request: RequestView, instances: Sequence[InstanceLoad], excluded: Set[str],
                  a: str, b: str, slos: float) -> tuple[str, str, str]:
        """Inside Serve (`follow_slos` set) the longest cached prefix leads. When some instance's cache
        saves at least `follow_share` of the prompt's prefill work, the one holding the most takes
        the request (of several that hold as much, the one with the shortest predicted wait),
        unless its predicted wait is past `slos` (`follow_slos`) × SLO: then the key's pair (`a`, `b`)
        decides, with the SLO switch. Below that share `_place` decides where `place_slos` is set;
        else the pair does, and where its two hold as much, the one with the shorter predicted wait
        takes it (two choices). Without router-side queues or a first token, Serve's SLO switch
        moved requests off their cache to no gain: a session's next turn, or a hot tenant's next
        session, is best where its prefix is (bench/results/ray_virtual.md, sessions 11 and 12).
        Every instance's cache is looked up once: fine at a deployment's replica count, so it is
        off in the proxy."""
        est, wait = self.estimate, self.holding.wait_for
        uncached = {inst.name: est.uncached(inst.name, request) for inst in instances if inst.name not in excluded}
        best, other = (a, b) if uncached[a] <= uncached[b] else (b, a)   # `better_of`'s order
        fewest = min(uncached.values())
        cold = est.prefill_work(request.prompt_tokens, 0)
        if cold - fewest >= self.follow_share * cold:   # the holder saves at least that share of the work
            holders = [name for name, work in uncached.items() if work == fewest]
            waits = [wait(name, fewest) for name in holders]
            if min(waits) <= slos * self.context.slo_ttft_s:
                target = holders[waits.index(min(waits))]   # the first of equal waits
                return target, other if target == best else best, "follow"
            return self._pair(request, best, other, uncached[best], uncached[other])
        if self.place_slos is not None:
            return self._place(uncached, best, other, self.place_slos)
        pick, alt, reason = self._pair(request, best, other, uncached[best], uncached[other])
        if uncached[alt] == uncached[pick] and wait(alt, uncached[pick]) < wait(pick, uncached[pick]):
            return alt, pick, "two-choices"
        return pick, alt, reason

    def _place(self, uncached: dict[str, int], best: str, other: str, slos: float) -> tuple[str, str, str]:
        """A new prefix (no cache saves `follow_share` of its work) goes to the instance that has been
        sent the least prompt content it did not hold, of those whose predicted wait is within
        `slos` × SLO (else to the shortest wait). Its later requests follow it there, so this spreads
        what the caches must hold, as Ray Serve LLM's PrefixCacheAffinityRouter does with its
        smallest prefix tree. The key's pair would place it by the replicas' names, which Serve
        draws anew for every deployment: DualMap's SLO and hits then varied by which tenants' pairs
        the draw happened to overlap (bench/results/ray_virtual.md, session 12); inside Serve one
        router sees all it sends, so it can place by that instead."""
        wait, limit = self.holding.wait_for, slos * self.context.slo_ttft_s
        waits = {name: wait(name, work) for name, work in uncached.items()}
        within = [name for name, w in waits.items() if w <= limit]
        placed = self._placed
        target = (min(within, key=lambda name: (placed.get(name, 0), waits[name])) if within
                  else min(waits, key=waits.__getitem__))
        return target, other if target == best else best, "placed"

    def hold(self, request: RequestView, index: int, instances: Sequence[InstanceLoad], reason: str) -> None:
        name = instances[index].name
        other = self._other.pop(request.request_id, name)
        self.holding.push(Held(request, name, other, reason, self.estimate.uncached(name, request)))

    def cancel(self, request_id: str) -> bool:
        """Forget a held request (its client went away); False when it is not held here."""
        self._other.pop(request_id, None)
        return bool(self.holding.drop(lambda h: h.request.request_id == request_id))

    def queued(self) -> dict[str, int]:
        return self.holding.depths()

    def _rehome_orphans(self, instances: Sequence[InstanceLoad]) -> None:
        """Held requests whose instance (or other candidate) left the membership are routed again
        over the current rings, keeping their place in arrival order."""
        alive = self._members.index
        for held in self.holding.drop(lambda h: h.home not in alive or h.other not in alive):
            decision = self.route(held.request, instances)
            name = instances[decision.index].name
            other = self._other.pop(held.request.request_id, name)
            self.holding.push(Held(held.request, name, other, decision.reason,
                                   self.estimate.uncached(name, held.request), held.order))

    def release(self, instances: Sequence[InstanceLoad],
                now: float | None = None) -> list[tuple[RequestView, int, str]]:
        self._sync(instances)
        if self._rehome:
            self._rehome = False
            self._rehome_orphans(instances)
        if now is not None:
            self.holding.advance(now)
        self.holding.rebalance()
        index = self._members.index
        room = None
        if self.kv_high is not None:
            capacity = self.context.kv_capacity_tokens
            high = self.kv_high

            def room(name: str, held: Held) -> bool:
                # An instance with nothing in flight (from any router replica) always has room;
                # otherwise its scraped usage plus this prompt must stay under kv_high, or decodes
                # there would start preempting.
                inst = instances[index[name]]
                if inst.in_flight + inst.peer_in_flight <= 0:
                    return True
                return inst.kv_usage + held.request.prompt_tokens / capacity <= high
        return [(h.request, index[h.home], h.reason) for h in self.holding.release(room, index)]

    def release_all(self, instances: Sequence[InstanceLoad]) -> list[tuple[RequestView, int, str]]:
        """Every held request, now, at the instance whose queue holds it (in arrival order)."""
        self._sync(instances)
        if self._rehome:
            self._rehome = False
            self._rehome_orphans(instances)
        index = self._members.index
        held = sorted(self.holding.drop(lambda h: True), key=lambda h: h.order)
        for h in held:
            self._other.pop(h.request.request_id, None)
        return [(h.request, index[h.home], h.reason) for h in held]

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        self._other.pop(request.request_id, None)
        name = instances[index].name
        held = self.estimate.dispatched(request, name)
        if self.place_slos is not None:
            new = max(0, request.prompt_tokens - held)
            self._placed[name] = self._placed.get(name, 0) + new
            self._placing[request.request_id] = (name, new)

    def on_complete(self, request: RequestView, outcome: Outcome) -> None:
        """A dispatch that never ran its prefill there (inside Serve: a claim given back) did not
        place its prompt there either."""
        super().on_complete(request, outcome)
        placing = self._placing.pop(request.request_id, None)
        if placing is not None and not outcome.prefilled:
            name, new = placing
            self._placed[name] -= new

    def ring_placement(self) -> DualMap:
        return self

    def placement_key(self, block_hashes: list[int]) -> tuple[int, int]:
        """The ring key a prompt is placed by and its depth in blocks (adaptive depth is peeked, not counted)."""
        if self.adaptive is not None:
            return self.adaptive.peek(block_hashes)
        return block_hashes[min(self.depth, len(block_hashes)) - 1] & _MASK64, min(self.depth, len(block_hashes))
