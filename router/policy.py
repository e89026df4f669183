"""The routing policy interface, shared by the live proxy and the virtual-time cluster.

A policy is pure and deterministic given its inputs and seed: a request view and the load of
each instance go in, a decision (which instance, and why) comes out. The proxy and the
simulator keep `InstanceLoad` up to date from what they dispatch and what finishes, so the
same policy object routes real traffic and simulated traffic alike.

The contract, in the order a request meets it:
- `route(request, instances, excluded)`: the instance list is the pool's membership, the same
  list object while membership is unchanged (ring policies rebuild only when it changes).
  `excluded` names instances this attempt must not use (a retry's tried ones, a pick that is
  full): a filter on the candidates, never a membership change, so it costs no ring rebuild.
- `route_decode(request, instances, excluded)`: in P/D, the decode half of the pair, chosen once
  the prefill has run on `request.prefill_instance` (the decode pool's load has moved on by then).
- `on_dispatch`, `on_first_token`, then exactly one `on_complete(request, outcome)` per dispatch,
  which says whether the instance ever ran the prompt's prefill: a policy that believes the
  prompt is now cached there must take that back when it did not.
- Capabilities a consumer asks for instead of fishing attributes out: `cache_estimate()` (what
  the policy believes each instance caches; KV events and handovers feed it) and
  `ring_placement()` (the prefix key the policy places prompts by on DualMap's rings, which the
  scale-event handover follows). Both are None for policies without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

NOTHING: frozenset[str] = frozenset()


@dataclass(slots=True)
class RequestView:
    request_id: str
    prompt_tokens: int
    block_hashes: list[int]  # chained hashes of the prompt's full blocks at the engines' block size
    arrival: float = 0.0
    # Chained keys of the prompt's blocks in the engine's own tokens and block size, when the router
    # knows the model's tokenizer and follows KV events (`kvpilot.router.kv_events`); else empty.
    engine_blocks: tuple[int, ...] = ()
    # In P/D, the instance the prefill ran on, set before the decode half is routed.
    prefill_instance: str = ""


@dataclass(slots=True)
class InstanceLoad:
    """What the router knows about one instance without asking it."""

    name: str
    in_flight: int = 0                # dispatched and not finished
    pending_prefill_tokens: int = 0   # prompt tokens dispatched whose first token has not come back
    pending_prefill: int = 0          # requests dispatched whose first token has not come back
    engine_running: int = 0           # scraped from vllm:num_requests_running (lags a scrape interval)
    engine_waiting: int = 0           # scraped from vllm:num_requests_waiting
    kv_usage: float = 0.0             # scraped from vllm:kv_cache_usage_perc
    # Other router replicas' requests there, from the last scrape (`kvpilot.router.engine_load`).
    peer_in_flight: int = 0
    peer_waiting: int = 0             # of which waiting for their prefill
    peer_prompt_tokens: int | None = None  # their prompts' tokens before a first token, where the engine says
    kv_block_size: int | None = None  # the engine's KV block size, where its /metrics says (vLLM)


@dataclass(slots=True, frozen=True)
class Decision:
    index: int      # position in the instance list the policy was given
    reason: str     # e.g. "round-robin", "affinity", "slo-fallback"


Status = Literal["ok", "failed", "rejected", "cancelled"]


@dataclass(slots=True, frozen=True)
class Outcome:
    """How one dispatch ended. `status`: ok; failed (upstream error or timeout, before or after
    its first byte); rejected (the instance answered 4xx: it never ran the prompt); cancelled (the
    client went away). `prefilled`: the instance returned a first token, so the prompt went through
    its prefill and sits in its prefix cache, whatever happened after."""

    instance: str
    status: Status
    prefilled: bool


@dataclass(slots=True, frozen=True)
class PolicyContext:
    """What a policy may know about the deployment: one SLO drives routing thresholds."""

    slo_ttft_s: float = 5.0
    block_size: int = 16
    kv_capacity_tokens: int = 400_000   # per instance, for cache-state estimates
    seed: int = 0
    prefill_token_s: float = 30e-6      # prior for one prompt token's prefill time, until calibrated online
    # Cross-instance prefix sharing (vLLM engines on kvpilot's Redis store): any instance can load a
    # prefix another computed, so a non-owner's cost for a stored prefix is a load, each token
    # costing `store_token_cost` of a prefill token, not a prefill. Off: an instance's cost counts
    # its own cache only (affinity alone).
    shared_store: bool = False
    store_token_cost: float = 0.25


class CacheView(Protocol):
    """Observed cache contents (vLLM KV events) that override the shadow cache where known."""

    def cached_tokens(self, name: str, request: RequestView) -> int | None: ...


class CacheEstimate(Protocol):
    """A policy's belief about each instance's prefix cache and prefill speed, declared through
    `Policy.cache_estimate` so the proxy (KV events, metrics) and the handover (what a pod holds,
    what it was given) work with any policy that keeps one."""

    @property
    def token_s(self) -> Mapping[str, float]:
        """Per instance, the calibrated prefill seconds per token."""

    def cached_blocks(self, name: str, block_hashes: list[int]) -> int:
        """Leading blocks of a prompt believed cached at `name` (0 for an instance not seen yet)."""

    def learn(self, name: str, block_hashes: list[int]) -> None:
        """`name` now holds these blocks (a handover imported them there)."""

    def prefill_s(self, request_id: str) -> float:
        """The predicted seconds of a dispatched request's own prefill where it went (0 once its
        first token came, or for a request never dispatched)."""

    def follow(self, observed: CacheView) -> None:
        """Take cache contents from observed KV events, where they know, over the estimate."""


class RingPlacement(Protocol):
    """A policy that places prompts by a prefix key on DualMap's two rings."""

    def placement_key(self, block_hashes: list[int]) -> tuple[int, int]:
        """The key a prompt is placed by and its depth in blocks, without counting the prompt
        (routing does; this only looks)."""


class Policy(Protocol):
    name: str

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision: ...

    def route_decode(self, request: RequestView, instances: Sequence[InstanceLoad],
                     excluded: Set[str] = NOTHING) -> Decision: ...

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None: ...

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        """`ttft_s`: seconds from dispatch to the instance until its first token (router-side queueing
        excluded, so it measures the instance); None when the proxy could not observe it (non-streaming,
        or the attempt failed: `on_complete` then says which)."""

    def on_complete(self, request: RequestView, outcome: Outcome) -> None: ...

    def cache_estimate(self) -> CacheEstimate | None: ...

    def ring_placement(self) -> RingPlacement | None: ...


@runtime_checkable
class HoldingPolicy(Policy, Protocol):
    """A policy that keeps requests in router-side queues and releases them late (DualMap).

    The driver calls `hold` instead of dispatching, then dispatches whatever `release` returns
    (calling `on_dispatch` for each as usual) after every arrival and every first token; the live
    proxy also after completions, membership changes and on a periodic tick (passing `now`)."""

    def hold(self, request: RequestView, index: int, instances: Sequence[InstanceLoad], reason: str) -> None: ...

    def release(self, instances: Sequence[InstanceLoad],
                now: float | None = None) -> list[tuple[RequestView, int, str]]: ...

    def release_all(self, instances: Sequence[InstanceLoad]) -> list[tuple[RequestView, int, str]]:
        """Every held request at once, whatever the budget (the proxy stops holding while it lags)."""

    def cancel(self, request_id: str) -> bool:
        """Drop a held request whose client went away; False when it is not held."""

    def queued(self) -> dict[str, int]:
        """Held requests per instance name."""


def allowed(instances: Sequence[InstanceLoad], excluded: Set[str]) -> Sequence[int]:
    """Indices of the instances a decision may pick; LookupError when there are none."""
    if not excluded:
        if not instances:
            raise LookupError("no instances to route to")
        return range(len(instances))
    out = [i for i, inst in enumerate(instances) if inst.name not in excluded]
    if not out:
        raise LookupError("every instance is excluded")
    return out


def least_loaded(instances: Sequence[InstanceLoad], excluded: Set[str] = NOTHING) -> int:
    """The allowed instance with the fewest uncompleted prefill tokens, then fewest in flight (other
    router replicas' requests included)."""
    return min(allowed(instances, excluded),
               key=lambda i: (instances[i].pending_prefill_tokens,
                              instances[i].in_flight + instances[i].peer_in_flight, i))


class BasePolicy:
    """Defaults for the optional parts of the contract: no feedback, least-loaded decode halves,
    no cache estimate, no ring placement."""

    name = "base"

    def __init__(self, context: PolicyContext | None = None) -> None:
        self.context = context or PolicyContext()

    def route_decode(self, request: RequestView, instances: Sequence[InstanceLoad],
                     excluded: Set[str] = NOTHING) -> Decision:
        """The decode half of a P/D pair. The cache a policy steers by lives where prefill runs,
        and the KV arrives by transfer whichever decode instance takes it, so by default the
        decode half balances load."""
        return Decision(least_loaded(instances, excluded), "least-loaded")

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        return None

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        return None

    def on_complete(self, request: RequestView, outcome: Outcome) -> None:
        return None

    def cache_estimate(self) -> CacheEstimate | None:
        return None

    def ring_placement(self) -> RingPlacement | None:
        return None


class DecodeSide(BasePolicy):
    """The decode pool's face of a P/D model's policy: it routes with the policy's pair selection
    (`route_decode`) and sends no feedback (BasePolicy's no-ops), since that feedback is about the
    prefill side's cache and backlog."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy
        self.name = f"{policy.name}/decode"

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        return self.policy.route_decode(request, instances, excluded)

    def route_decode(self, request: RequestView, instances: Sequence[InstanceLoad],
                     excluded: Set[str] = NOTHING) -> Decision:
        return self.policy.route_decode(request, instances, excluded)
