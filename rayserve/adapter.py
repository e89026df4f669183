"""A kvpilot policy fed from Ray Serve's view of a deployment, without Ray.

The Ray router (`kvpilot.ray.router`) is a thin shell around `PolicyAdapter`: Ray names replicas
by id strings, reports their queue lengths and periodic routing stats, and asks for ranks of
replicas; the policy wants a stable membership list of `InstanceLoad`s, a `RequestView` and
exactly one `on_complete` per dispatch. This module is that mapping, kept pure so it is tested
without a Ray cluster.

What differs from the proxy: Serve queues a request itself (it backs off and asks again when
every replica in the ranks is at `max_ongoing_requests`), so a holding policy (DualMap) routes
here without its router-side queues; a pick counts as dispatched when it is ranked, since Serve
reports where a request went only after its assignment (`rank_view`); the first token is not
observed by a router, so the prefill backlog a request adds is released when the replica's
routing stats show it started and had time to prefill (`StartedBySample`), or else when it
completes. With no first token to correct it, DualMap's predicted wait is only as good as its
shadow cache, so here it tracks every block of it, a request whose prefix is cached goes where the
most of it is, and a new prefix where the least prompt content has gone (`serve_policy`).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvpilot.router.estimate import EXACT, LoadEstimator
from kvpilot.router.policies import make_policy
from kvpilot.router.policies.dualmap import DualMap
from kvpilot.router.policy import InstanceLoad, Outcome, Policy, PolicyContext, RequestView
from kvpilot.tokens import block_hashes, token_count

log = logging.getLogger("kvpilot.ray")

# DualMap inside Serve: exact shadow caches. The proxy's ladder (every 2^k-th block past the first
# eight) finds a growing agentic session's previous turn only up to the ladder step below its end,
# so it under-counted the engine's hit by ~1k tokens at the median (3k at p90) and over-predicted
# waits by 0.24 s: needless switches off the cache. Exact: agentic in SLO 83.4 → 84.9%, hits
# 84.9 → 85.8% (seeds 0-5; held out, 6-11: +0.1 / +0.7), Mooncake, chat and rag within 0.1
# (bench/results/ray_virtual.md, session 9). The cost is O(prompt blocks) per lookup and insert,
# small at a deployment's replica count.
# And the longest cached prefix leads (`DualMap._in_serve`): when an instance's cache saves at least
# half the prompt's prefill work, the one holding the most takes the request (of equal holders the
# shortest predicted wait) unless its wait is past 8 × SLO; otherwise the pair decides, the shorter
# wait of the two where they hold as much. Against session 10's follow (512 tokens' gain within
# 0.75 × SLO): agentic seeds 0-5 in SLO / hits 85.2 / 86.2 → 87.2 / 86.9%, held out 6-11
# 91.8 / 85.6 → 91.8 / 86.3%, Mooncake up 0.2-0.4 / 0.4-0.5, chat and rag within 0.3 (session 11).
# Session 12: a new prefix is placed where the least prompt content has gone (`DualMap._place`, within
# 2 × SLO of wait), not on its key's pair, and the longest cached prefix leads from 10% of the work
# saved (PrefixCacheAffinityRouter's share) instead of half. The pair placed by the replicas' names,
# which Serve draws at random: under 10 draws of them, the agentic live slices went from 100.0 /
# 76.8% and 98.6 / 73.9% (in SLO / hits, 40 and 50 req/s) to 100.0 / 77.2% and 99.7 / 74.1%, the
# peer's, in every draw; Mooncake's from 91.8 / 3.6% and 77.9 / 3.6% to 95.0 / 3.6% and 86.0 / 3.6%
# (the peer 89.0 / 3.6% and 75.0 / 3.6%) (bench/results/ray_virtual.md, session 12).
# Session 15: a running request's blocks stay in the shadow cache until it ends (`pin_running`), as
# vLLM evicts only blocks no running request holds. Mooncake with its full outputs (600 requests,
# seeds 1-4 and, held out, 5-8): hits 6.54 → 6.83% and 6.58 → 6.80%, in SLO 94.5 → 94.9% and 97.2%
# both; agentic and chat unchanged, rag hits +0.13 (bench/results/ray_virtual.md, session 15).
SERVE_DUALMAP: dict[str, Any] = {"shadow_dense": EXACT, "follow_slos": 8.0, "follow_share": 0.1, "place_slos": 2.0,
                                 "pin_running": True}


def serve_policy(name: str, context: PolicyContext) -> Policy:
    """The policy by its registry name, as a Serve router runs it."""
    if name == DualMap.name:
        return DualMap(context, **SERVE_DUALMAP)
    return make_policy(name, context)


# Requests ranked but never routed (cancelled while Serve backed off) are forgotten past this many,
# or once not ranked again for this long (Serve ranks a waiting request again at least every
# RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S, 0.5 s by default): their claims are withdrawn.
MAX_PENDING = 10_000
CLAIM_TTL_S = 30.0

# The keys the simulator deployment's `record_routing_stats` reports (vLLM's metric names).
STAT_RUNNING = "num_requests_running"
STAT_WAITING = "num_requests_waiting"
STAT_KV_USAGE = "kv_cache_usage_perc"
# When the replica took them (its wall clock, `time.time()`); without it, no start is inferred.
STAT_SAMPLED_AT = "sampled_at"


@dataclass(slots=True)
class _Ranked:
    view: RequestView
    at: float                 # when it was last ranked (`clock`)
    claim: str | None = None  # the pick it is counted as dispatched to until Serve says where it went


@dataclass(slots=True)
class _Dispatch:
    view: RequestView
    name: str
    prefilled: bool = False   # its prefill is done (inferred from routing stats): its backlog was released


class StartedBySample:
    """When each of this router's requests has its prefill done, inferred from the waiting count
    in the replicas' routing stats.

    A router inside Serve never sees a first token, so a request's prefill would stay in the
    predicted backlog until it completes, decode included. That inflated backlog made DualMap
    switch requests away from their cached prefix (bench/results/ray_virtual.md). vLLM schedules
    first come, first served: when a replica that sampled its stats at `at` reports `waiting`
    requests waiting, all but the newest `waiting` of the requests this router had sent there
    before `at` have started. A started prompt is still prefilling (a long one takes several
    chunked steps), so its prefill counts as done only its own predicted prefill time after the
    sample (`prefill_s`). Other routers' requests only make `waiting` larger, so with several
    routers the inference is late, never early; a preempted request back in the queue does the same."""

    def __init__(self) -> None:
        self._queues: dict[str, OrderedDict[str, float]] = {}   # replica → request → when sent, oldest first
        self._sampled: dict[str, float] = {}
        self._prefilling: dict[str, str] = {}                   # request → replica, started and not done
        self._done_at: list[tuple[float, str]] = []             # heap of (prefill done, request)

    def sent(self, name: str, request_id: str, at: float) -> None:
        self._queues.setdefault(name, OrderedDict())[request_id] = at

    def ended(self, name: str, request_id: str) -> None:
        queue = self._queues.get(name)
        if queue is not None:
            queue.pop(request_id, None)
        self._prefilling.pop(request_id, None)

    def sample(self, name: str, waiting: int, at: float, prefill_s: Callable[[str], float]) -> None:
        """Take a sample (one seen before changes nothing): the requests it shows started will be
        done `prefill_s(request)` after it."""
        if at <= self._sampled.get(name, float("-inf")):
            return
        self._sampled[name] = at
        queue = self._queues.get(name)
        if not queue:
            return
        before = [rid for rid, sent in queue.items() if sent < at]
        for rid in before[: max(0, len(before) - waiting)]:
            del queue[rid]
            self._prefilling[rid] = name
            heapq.heappush(self._done_at, (at + prefill_s(rid), rid))

    def done(self, now: float) -> list[str]:
        """The requests whose prefill is done by `now` (each named once, oldest first)."""
        out = []
        while self._done_at and self._done_at[0][0] <= now:
            _, rid = heapq.heappop(self._done_at)
            if self._prefilling.pop(rid, None) is not None:
                out.append(rid)
        return out

    def forget(self, name: str) -> None:
        self._queues.pop(name, None)
        self._sampled.pop(name, None)
        for rid in [rid for rid, where in self._prefilling.items() if where == name]:
            del self._prefilling[rid]


class PolicyAdapter:
    """One policy routing among one deployment's replicas, as one Serve router process sees them."""

    def __init__(self, policy: Policy, block_size: int = 16, max_hashed_blocks: int | None = 4096,
                 clock: Callable[[], float] = time.time, time_scale: float = 1.0, claim: bool = True) -> None:
        self.policy = policy
        self.block_size = block_size
        self.max_hashed_blocks = max_hashed_blocks
        self.clock = clock                      # the replicas' stats time (`STAT_SAMPLED_AT`): wall clock
        # Engine seconds per `clock` second: 1 for real engines; the simulator at time scale 0.1 runs
        # 10× slower than the engine time the policy predicts in.
        self.time_scale = time_scale
        # Count a pick as dispatched when ranked (`rank_view`); False: only once Serve reports it
        # routed, as before session 14 and as Ray's own routers count theirs (an ablation).
        self.claim = claim
        self.last_reason = ""                   # the policy's reason for its last pick
        self.loads: list[InstanceLoad] = []     # the membership, one list object while it is unchanged
        self._index: dict[str, int] = {}
        self._own: dict[str, int] = {}          # requests this router routed there and saw no completion of
        # Ranked and not yet reported routed, oldest rank first, each counted as dispatched to its
        # pick (a claim) until Serve says where it went.
        self._ranked: OrderedDict[str, _Ranked] = OrderedDict()
        self._routed: dict[str, _Dispatch] = {}
        self._starts = StartedBySample()

    # -- membership and load ------------------------------------------------------------
    def set_members(self, names: Sequence[str]) -> bool:
        """The deployment's replicas (Ray's `update_replicas`). Loads of replicas that stay are kept;
        the list object is replaced only when membership changes, so ring policies rebuild then only.
        True when it changed."""
        wanted = sorted(set(names))
        if wanted == [inst.name for inst in self.loads]:
            return False
        old = {inst.name: inst for inst in self.loads}
        self.loads = [old.get(name) or InstanceLoad(name) for name in wanted]
        self._index = {inst.name: i for i, inst in enumerate(self.loads)}
        self._own = {name: self._own.get(name, 0) for name in wanted}
        return True

    def observe(self, name: str, queue_len: int | None, stats: Mapping[str, object] | None = None) -> None:
        """Ray's signals for one replica: the router's queue-length cache (fresh, this process's
        view; None when unknown or stale, then this router's own count stands in) and the replica's
        periodic routing stats (global, about a stats period behind). A new sample with its time
        releases the prefill backlog of the requests it shows started."""
        i = self._index.get(name)
        if i is None:
            return
        load = self.loads[i]
        load.in_flight = queue_len if queue_len is not None else self._own.get(name, 0)
        if stats:
            load.engine_running = _int(stats.get(STAT_RUNNING), load.engine_running)
            waiting = stats.get(STAT_WAITING)
            load.engine_waiting = _int(waiting, load.engine_waiting)
            usage = stats.get(STAT_KV_USAGE)
            if isinstance(usage, int | float):
                load.kv_usage = float(usage)
            at = stats.get(STAT_SAMPLED_AT)
            if isinstance(at, int | float) and isinstance(waiting, int) and not isinstance(waiting, bool):
                self._starts.sample(name, waiting, float(at), self._prefill_s)
        self._release_prefilled()

    def _prefill_s(self, request_id: str) -> float:
        """The request's predicted prefill time on `clock`."""
        estimate = self.policy.cache_estimate()
        return 0.0 if estimate is None else estimate.prefill_s(request_id) / self.time_scale

    def _release_prefilled(self) -> None:
        for request_id in self._starts.done(self.clock()):
            self._prefill_done(request_id)

    def _prefill_done(self, request_id: str) -> None:
        """The request's prefill is done: its backlog leaves the load and the policy's estimate
        (the policy's `on_first_token`, with no TTFT: none was measured)."""
        done = self._routed.get(request_id)
        if done is None or done.prefilled:
            return
        done.prefilled = True
        load = self.load(done.name)
        if load is not None:
            load.pending_prefill_tokens = max(0, load.pending_prefill_tokens - done.view.prompt_tokens)
        self.policy.on_first_token(request_id, None)

    # -- the request path -----------------------------------------------------------------
    def view(self, request_id: str, prompt: str) -> RequestView:
        data = prompt.encode()
        return RequestView(request_id, token_count(data), block_hashes(data, self.block_size, self.max_hashed_blocks),
                           time.monotonic())

    def rank(self, request_id: str, prompt: str | None, candidates: Sequence[str]) -> list[list[str]]:
        """Ranks of candidate replica names, best first: the policy's pick alone, then every other
        candidate (Serve takes the least queued of a rank), or one rank of all when there is no
        prompt or nothing to choose between."""
        if prompt is None:
            return [list(candidates)]
        ranked = self._ranked.get(request_id)
        return self.rank_view(ranked.view if ranked else self.view(request_id, prompt), candidates)

    def rank_view(self, view: RequestView, candidates: Sequence[str]) -> list[list[str]]:
        """`rank` for a request already viewed (the virtual-time emulation, bench/ray_virtual.py,
        has views, not prompts).

        The pick is counted as dispatched there at once (a claim), not when Serve reports it routed:
        Serve ranks each request of a burst within milliseconds but reports each only after its
        asynchronous assignment, so without the claim every request of a burst saw the same loads
        and the same least-placed replica, and went there (live, Mooncake's bursts, up to 16 requests
        stamped together, were placed 3.9 in a row on one replica; bench/results/ray_routing.md,
        sessions 13 and 14). A request ranked again (Serve backed off, or the replica turned it
        away) first gives its claim back."""
        now = self.clock()
        self._withdraw(view.request_id)
        self._expire(now)
        self._ranked[view.request_id] = ranked = _Ranked(view, now)
        usable = [name for name in candidates if name in self._index]
        if len(usable) < 2:
            return [list(candidates)]
        self._release_prefilled()
        allowed = set(usable)
        excluded = frozenset(inst.name for inst in self.loads if inst.name not in allowed)
        decision = self.policy.route(view, self.loads, excluded)
        self.last_reason = decision.reason
        pick = self.loads[decision.index].name
        if log.isEnabledFor(logging.DEBUG):
            log.debug("route %s (%d tokens) to %s (%s); predicted TTFT s by replica: %s", view.request_id,
                      view.prompt_tokens, pick, decision.reason, self.predicted_ttfts(view))
        if self.claim:
            self._dispatch(view, pick)
            ranked.claim = pick
        rest = [name for name in candidates if name != pick]
        return [[pick], rest] if rest else [[pick]]

    def _dispatch(self, view: RequestView, name: str) -> None:
        """Count `view` as sent to `name`: the policy's `on_dispatch` and the replica's load."""
        i = self._index[name]
        self.policy.on_dispatch(view, i, self.loads)
        load = self.loads[i]
        load.in_flight += 1
        load.pending_prefill_tokens += view.prompt_tokens

    def _undo(self, view: RequestView, name: str) -> None:
        """Take back a `_dispatch` that never reached `name`: it ends, unprefilled, for the policy."""
        load = self.load(name)
        if load is not None:
            load.in_flight = max(0, load.in_flight - 1)
            load.pending_prefill_tokens = max(0, load.pending_prefill_tokens - view.prompt_tokens)
        self.policy.on_first_token(view.request_id, None)
        self.policy.on_complete(view, Outcome(name, "cancelled", prefilled=False))

    def _expire(self, now: float) -> None:
        """Withdraw the oldest ranks while too many are pending or they are stale."""
        ranked = self._ranked
        while ranked:
            request_id, oldest = next(iter(ranked.items()))
            if len(ranked) < MAX_PENDING and oldest.at >= now - CLAIM_TTL_S:
                return
            self._withdraw(request_id)

    def _give_back(self, ranked: _Ranked) -> None:
        """Undo a ranked request's claim, if it holds one; it stays ranked."""
        if ranked.claim is not None:
            self._undo(ranked.view, ranked.claim)
            ranked.claim = None

    def _withdraw(self, request_id: str) -> None:
        """Forget a ranked request, giving back its claim."""
        ranked = self._ranked.pop(request_id, None)
        if ranked is not None:
            self._give_back(ranked)

    def predicted_ttfts(self, view: RequestView) -> dict[str, float]:
        """What the policy's estimate predicts `view` would wait at each replica, for tracing a
        decision (a cache lookup per replica: only when asked); empty for a policy without one."""
        estimate = self.policy.cache_estimate()
        if not isinstance(estimate, LoadEstimator):
            return {}
        return {inst.name: round(estimate.predicted_ttft(inst.name, estimate.uncached(inst.name, view)), 3)
                for inst in self.loads}

    def routed(self, request_id: str, name: str) -> None:
        """Serve sent the request to `name` (which accepted it): its claim stands, or moves there
        when Serve took another replica than the pick (the pick was full)."""
        ranked = self._ranked.get(request_id)
        if ranked is None:
            return
        if ranked.claim != name or name not in self._index:
            self._withdraw(request_id)
            if name not in self._index:
                return
            self._dispatch(ranked.view, name)
        else:
            del self._ranked[request_id]
        self._own[name] = self._own.get(name, 0) + 1
        self._routed[request_id] = _Dispatch(ranked.view, name)
        self._starts.sent(name, request_id, self.clock())

    def completed(self, request_id: str, name: str | None = None) -> None:
        """The request's attempt at `name` ended (success, error or cancel; Ray does not say which):
        the policy's `on_first_token` (unobserved; unless a sample showed it started) and
        `on_complete`. An attempt that ends before Serve reported it routed was turned away by the
        replica: its claim is given back, and the request stays ranked for Serve's retry."""
        done = self._routed.get(request_id)
        if done is None or (name is not None and done.name != name):
            ranked = self._ranked.get(request_id)
            if ranked is not None and name in (None, ranked.claim):
                self._give_back(ranked)
            return
        self._prefill_done(request_id)
        del self._routed[request_id]
        name = done.name
        self._starts.ended(name, request_id)
        load = self.load(name)
        if load is not None:
            load.in_flight = max(0, load.in_flight - 1)
        if name in self._own:
            self._own[name] = max(0, self._own[name] - 1)
        self.policy.on_complete(done.view, Outcome(name, "ok", prefilled=True))

    def removed(self, name: str) -> None:
        """A replica died: requests routed there complete as failed without a prefill, and those
        claimed there give their claims back (Serve will rank them again)."""
        for ranked in self._ranked.values():
            if ranked.claim == name:
                self._give_back(ranked)
        for request_id, done in list(self._routed.items()):
            if done.name == name:
                del self._routed[request_id]
                if not done.prefilled:
                    self.policy.on_first_token(request_id, None)
                self.policy.on_complete(done.view, Outcome(name, "failed", prefilled=False))
        self._starts.forget(name)
        self.set_members([inst.name for inst in self.loads if inst.name != name])

    def load(self, name: str) -> InstanceLoad | None:
        i = self._index.get(name)
        return None if i is None else self.loads[i]

    def in_flight(self) -> int:
        return len(self._routed)


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
