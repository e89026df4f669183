"""The routing policy interface, shared by the live proxy and the virtual-time cluster.

A policy is pure and deterministic given its inputs and seed: a request view and the load of
each instance go in, a decision (which instance, and why) comes out. The proxy and the
simulator keep `InstanceLoad` up to date from what they dispatch and what finishes, so the
same policy object routes real traffic and simulated traffic alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class RequestView:
    request_id: str
    prompt_tokens: int
    block_hashes: list[int]  # chained hashes of the prompt's full blocks at the engines' block size
    arrival: float = 0.0
    # Chained keys of the prompt's blocks in the engine's own tokens and block size, when the router
    # knows the model's tokenizer and follows KV events (`kvpilot.router.kv_events`); else empty.
    engine_blocks: tuple[int, ...] = ()


@dataclass(slots=True)
class InstanceLoad:
    """What the router knows about one instance without asking it."""

    name: str
    in_flight: int = 0                # dispatched and not finished
    pending_prefill_tokens: int = 0   # prompt tokens dispatched whose first token has not come back
    engine_running: int = 0           # scraped from vllm:num_requests_running (lags a scrape interval)
    engine_waiting: int = 0           # scraped from vllm:num_requests_waiting
    kv_usage: float = 0.0             # scraped from vllm:kv_cache_usage_perc


@dataclass(slots=True, frozen=True)
class Decision:
    index: int      # position in the instance list the policy was given
    reason: str     # e.g. "round-robin", "affinity", "slo-fallback"


@dataclass(slots=True, frozen=True)
class PolicyContext:
    """What a policy may know about the deployment: one SLO drives routing thresholds."""

    slo_ttft_s: float = 5.0
    block_size: int = 16
    kv_capacity_tokens: int = 400_000   # per instance, for cache-state estimates
    seed: int = 0
    prefill_token_s: float = 30e-6      # prior for one prompt token's prefill time, until calibrated online


class Policy(Protocol):
    name: str

    def route(self, request: RequestView, instances: Sequence[InstanceLoad]) -> Decision: ...

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None: ...

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        """`ttft_s`: seconds from dispatch to the instance until its first token (router-side queueing
        excluded, so it measures the instance); None when the proxy could not observe it (non-streaming)."""


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


class BasePolicy:
    """No-op feedback hooks for policies that only look at the current load."""

    name = "base"

    def __init__(self, context: PolicyContext | None = None) -> None:
        self.context = context or PolicyContext()

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        return None

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        return None
