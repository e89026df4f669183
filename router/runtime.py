"""The router's state, built from its config: per model, the pools and what feeds them.

`Runtime(cfg)` is everything the request path, the admin endpoints and the background loops
share, and nothing that runs by itself: for each model a `ModelRuntime` with its pools (one, or
prefill and decode in P/D), its KV-event index, its dashboard timeline and where its endpoints
come from (config, an endpoints file, Kubernetes discovery); and, across models, the metrics,
the live-migration and the scale-event handover managers.

`ModelRuntime.request_view` is the pre-dispatch work every request pays before its policy runs:
the prompt's block hashes (the same function the engines' prefix cache uses). Where the router
follows KV events, `engine_keys` adds the prompt's keys in the engine's own tokens: the model's
chat template and tokenizer, which for a long prompt run in a worker thread, off the event loop
(bench/results/router_decision.md has what each costs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kvpilot.router.config import Endpoint, ModelConfig, RouterConfig
from kvpilot.router.dashboard import Timeline
from kvpilot.router.endpoints_file import EndpointsFile
from kvpilot.router.handover import Handovers
from kvpilot.router.kv_events import KVEventIndex, load_chat_template, load_tokenizer
from kvpilot.router.metrics import POOL_ROLE_LABEL, RouterMetrics
from kvpilot.router.migration import Migrator
from kvpilot.router.policies import make_policy
from kvpilot.router.policy import DecodeSide, Policy, PolicyContext, RequestView
from kvpilot.router.pool import Member, Pool
from kvpilot.tokens import block_hashes, token_count

log = logging.getLogger("kvpilot.router")
# Prompts longer than this (characters) are tokenized in a worker thread. A byte-level BPE
# tokenizer takes ≈ 0.5 µs per character (2 ms for a 1k-token prompt, 80 ms for 32k), the hop to
# a thread and back tens of µs, so only the shortest prompts are cheaper inline.
OFFLOAD_CHARS = 256


@dataclass(slots=True)
class ModelRuntime:
    """One model's pools: `main` serves requests (the decode side in P/D); `prefill` only in P/D,
    where the model's policy picks prefill and, through its pair selection, decode."""

    config: ModelConfig
    main: Pool
    prefill: Pool | None
    timeline: Timeline = field(default_factory=Timeline)
    kv_index: KVEventIndex | None = None
    endpoints_file: EndpointsFile | None = None
    discovered: dict[str, list[Endpoint]] = field(default_factory=dict)   # discovery role → its endpoints
    scaling_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def affinity_pool(self) -> Pool:
        """The pool whose policy steers by cache: where prefill runs."""
        return self.prefill or self.main

    def pools(self) -> list[Pool]:
        return [self.main] if self.prefill is None else [self.prefill, self.main]

    def roles(self) -> list[tuple[str, Pool]]:
        """Each pool with its role label in metrics."""
        if self.prefill is None:
            return [(POOL_ROLE_LABEL["aggregated"], self.main)]
        return [(POOL_ROLE_LABEL["prefill"], self.prefill), (POOL_ROLE_LABEL["decode"], self.main)]

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        """Split endpoints by role: in P/D, prefill-capable ones serve prefill, the others decode."""
        if self.prefill is None:
            self.main.set_endpoints(endpoints)
            return
        self.prefill.set_endpoints([e for e in endpoints if e.role in ("prefill", "both")])
        self.main.set_endpoints([e for e in endpoints if e.role in ("decode", "both")])

    def discovered_pods(self, role: str, endpoints: list[Endpoint]) -> None:
        """A discovery watch's current pods for one role; all roles' together are the endpoints."""
        self.discovered[role] = endpoints
        self.set_endpoints([e for _, eps in sorted(self.discovered.items()) for e in eps])
        log.info("endpoints discovered", extra={"model": self.name, "role": role,
                                                "endpoints": [e.name for e in endpoints]})

    def request_view(self, request_id: str, prompt: str) -> RequestView:
        """What the policy sees of a request: its size and block hashes."""
        cfg = self.config
        data = prompt.encode()
        return RequestView(request_id, token_count(data), block_hashes(data, cfg.block_size, cfg.max_hashed_blocks),
                           time.monotonic())

    async def engine_keys(self, view: RequestView, prompt: str, messages: Any = None) -> None:
        """With KV events, the prompt's keys in the engine's tokens (a chat rendered with the
        model's own template, as the engine renders it), set on `view`."""
        index = self.kv_index
        if index is None:
            return
        if messages is not None:
            def keys() -> tuple[int, ...]:
                return index.chat_keys(messages)
        else:
            def keys() -> tuple[int, ...]:
                return index.prompt_keys(prompt)
        view.engine_blocks = keys() if len(prompt) < OFFLOAD_CHARS else await asyncio.to_thread(keys)


class Runtime:
    """Every model's runtime, and the managers that span models."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.metrics = RouterMetrics()
        self.migrator = Migrator(self.metrics)
        self.handovers = Handovers(self.metrics)
        self.models: dict[str, ModelRuntime] = {}
        self.cache_counters: dict[str, tuple[float, float]] = {}   # endpoint URL → prefix-cache (hits, queries)
        for m in cfg.models:
            self.models[m.name] = self._model(m)

    def _model(self, m: ModelConfig) -> ModelRuntime:
        cfg = self.cfg
        ctx = PolicyContext(slo_ttft_s=m.slo_ttft_ms / 1000, block_size=m.block_size,
                            kv_capacity_tokens=m.kv_capacity_tokens, seed=cfg.seed, prefill_token_s=m.prefill_token_s,
                            shared_store=m.kv_transfer is not None and m.kv_transfer.share_prefixes,
                            store_token_cost=m.kv_transfer.store_token_cost if m.kv_transfer else 0.25)
        policy = make_policy(m.policy, ctx)

        def pool(p: Policy) -> Pool:
            return Pool([], p, breaker_failures=cfg.breaker_failures, breaker_cooldown_s=cfg.breaker_cooldown_s,
                        max_inflight=m.max_inflight_per_endpoint, hold=m.hold_requests, max_queued=m.max_queued)

        if m.mode == "disaggregated":
            model = ModelRuntime(m, pool(DecodeSide(policy)), pool(policy))
        else:
            model = ModelRuntime(m, pool(policy), None)
        for role, p in model.roles():
            p.on_queued = self.metrics.queued.labels(m.name, role).inc
        if m.kv_events is not None:
            model.kv_index = self._kv_index(model)
        if m.endpoints_file is not None:
            model.endpoints_file = EndpointsFile(m.endpoints_file)
        self.migrator.add_model(m.name, model.main, m.migration, m.slo_ttft_ms / 1000, m.engine)
        self.handovers.add_model(m.name, model.affinity_pool, m.handover, m.block_size, warm=m.shared_store())
        model.set_endpoints(m.endpoints)
        return model

    def _kv_index(self, model: ModelRuntime) -> KVEventIndex:
        """Observed cache contents replace the estimate of the policy that steers by the cache."""
        m = model.config
        assert m.kv_events is not None
        path, replay_port = m.kv_events.tokenizer, m.kv_events.replay_port

        def replay_address(name: str) -> str | None:
            """An instance's KV-event replay socket: its own setting, else its host at the model's port."""
            for pool in model.pools():
                member = pool.by_name.get(name)
                if member is not None:
                    e = member.endpoint
                    return e.kv_replay or (f"tcp://{e.url.host}:{replay_port}" if replay_port else None)
            return None

        tok, template = None, None
        if path:
            try:
                tok, template = load_tokenizer(path), load_chat_template(path)
            except Exception as e:   # an unreachable hub must not stop the router: it routes on its estimate
                log.error("cannot load the tokenizer from %s (%s): KV events are followed, prompts not keyed",
                          path, e, extra={"model": m.name})
        index = KVEventIndex(m.kv_events.block_size, tok, template, replay_address)
        index.on_replay = lambda name, outcome: self.metrics.kv_replays.labels(m.name, name, outcome).inc()
        estimate = model.affinity_pool.policy.cache_estimate()
        if estimate is not None:
            estimate.follow(index)
        else:
            log.warning("policy %s keeps no cache estimate: KV events are followed but not used for routing",
                        m.policy, extra={"model": m.name})
        return index

    def attempt_failed(self, model: ModelRuntime, pool: Pool, member: Member, why: str, request_id: str) -> None:
        """Count an upstream failure against the member's breaker (requests and scrapes alike)."""
        name = model.name
        self.metrics.upstream_errors.labels(name, member.endpoint.name).inc()
        if pool.failed(member):
            self.metrics.breaker_opened.labels(name, member.endpoint.name).inc()
            log.warning("circuit breaker opened", extra={"endpoint": member.endpoint.name, "model": name})
        log.info("upstream attempt failed: %s", why,
                 extra={"request_id": request_id, "endpoint": member.endpoint.name, "model": name})
