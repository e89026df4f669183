"""`kvpilot router`: the OpenAI-compatible streaming proxy around the routing policies.

For each request: validate, hash the prompt's blocks (the same function the engines' prefix
cache uses), ask the model's pool policy for an endpoint, forward, and stream the answer back
chunk by chunk without buffering. Failures before the first byte reach the client are retried
on another endpoint; after it, the client gets an SSE error event. In disaggregated mode a
request runs vLLM's P/D flow: a prefill request (`max_tokens=1`, `kv_transfer_params`) to the
prefill pool, then the real request with the returned params to the decode pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvpilot import logs
from kvpilot.router.config import Endpoint, ModelConfig, RouterConfig
from kvpilot.router.dashboard import Timeline, page
from kvpilot.router.discovery import PodWatcher
from kvpilot.router.endpoints_file import EndpointsFile
from kvpilot.router.handover import Handovers
from kvpilot.router.kv_events import KVEventIndex, load_chat_template, load_tokenizer
from kvpilot.router.metrics import POOL_ROLE_LABEL, RouterMetrics
from kvpilot.router.migration import Migrator
from kvpilot.router.policies import make_policy
from kvpilot.router.policy import DecodeSide, Policy, PolicyContext, RequestView
from kvpilot.router.pool import Attempt, LagGate, Member, NoEndpoint, Pool, QueueFull
from kvpilot.tokens import block_hashes, render_chat, token_count

log = logging.getLogger("kvpilot.router")
RETRY_AFTER_S = "1"


class ApiError(Exception):
    """An OpenAI-style error the client gets as JSON with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code or self.status}}

    def response(self) -> web.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return web.json_response(self.body(), status=self.status, headers=headers)


class UpstreamFailed(Exception):
    """An attempt failed before any byte reached the client: safe to retry elsewhere."""


@dataclass(slots=True)
class Served:
    """One model's pools: `main` serves requests (decode side in P/D); `prefill` only in P/D."""

    config: ModelConfig
    main: Pool
    prefill: Pool | None


class Router:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.metrics = RouterMetrics()
        self.migrator = Migrator(self.metrics)
        self.handovers = Handovers(self.metrics)
        self.models: dict[str, Served] = {}
        self.timelines: dict[str, Timeline] = {}
        self.kv_indexes: dict[str, KVEventIndex] = {}
        self._kv_tasks: list[asyncio.Task[None]] = []
        for m in cfg.models:
            ctx = PolicyContext(slo_ttft_s=m.slo_ttft_ms / 1000, block_size=m.block_size,
                                kv_capacity_tokens=m.kv_capacity_tokens, seed=cfg.seed,
                                prefill_token_s=m.prefill_token_s)

            policy = make_policy(m.policy, ctx)

            def pool(policy: Policy, m: ModelConfig = m) -> Pool:
                return Pool([], policy, breaker_failures=cfg.breaker_failures,
                            breaker_cooldown_s=cfg.breaker_cooldown_s, max_inflight=m.max_inflight_per_endpoint,
                            hold=m.hold_requests, max_queued=m.max_queued)

            if m.mode == "disaggregated":
                # The model's policy picks prefill, and the decode half of the pair (`route_decode`).
                served = Served(m, pool(DecodeSide(policy)), pool(policy))
            else:
                served = Served(m, pool(policy), None)
            for role, p in self._roles(served):
                p.on_queued = self.metrics.queued.labels(m.name, role).inc
            self.models[m.name] = served
            if m.kv_events is not None:
                self._follow_kv_events(m, served)
            self.migrator.add_model(m.name, served.main, m.migration, m.slo_ttft_ms / 1000, m.engine)
            self.handovers.add_model(m.name, served.prefill or served.main, m.handover, m.block_size)
            self.timelines[m.name] = Timeline()
            self._set_endpoints(served, m.endpoints)
        self.session: aiohttp.ClientSession | None = None
        self._scraper: asyncio.Task[None] | None = None
        self._holder: asyncio.Task[None] | None = None
        self._watchers: list[PodWatcher] = []
        self._discovered: dict[tuple[str, str], list[Endpoint]] = {}
        self._files = {name: EndpointsFile(s.config.endpoints_file) for name, s in self.models.items()
                       if s.config.endpoints_file is not None}
        self.scaling_events: dict[str, list[dict[str, Any]]] = {}
        self._cache_counters: dict[str, tuple[float, float]] = {}   # endpoint URL → prefix-cache (hits, queries)

    def _follow_kv_events(self, m: ModelConfig, served: Served) -> None:
        """Observed cache contents replace the shadow estimate of the pool whose policy uses the cache."""
        assert m.kv_events is not None
        path, replay_port = m.kv_events.tokenizer, m.kv_events.replay_port

        def replay_address(name: str) -> str | None:
            """An instance's KV-event replay socket: its own setting, else its host at the model's port."""
            for pool in (served.main, served.prefill):
                member = None if pool is None else pool.by_name.get(name)
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
        self.kv_indexes[m.name] = index
        estimate = (served.prefill or served.main).policy.cache_estimate()
        if estimate is not None:
            estimate.follow(index)
        else:
            log.warning("policy %s keeps no cache estimate: KV events are followed but not used for routing",
                        m.policy, extra={"model": m.name})

    @staticmethod
    def _roles(served: Served) -> list[tuple[str, Pool]]:
        if served.prefill is None:
            return [(POOL_ROLE_LABEL["aggregated"], served.main)]
        return [(POOL_ROLE_LABEL["prefill"], served.prefill), (POOL_ROLE_LABEL["decode"], served.main)]

    @staticmethod
    def _set_endpoints(served: Served, endpoints: list[Endpoint]) -> None:
        """Split endpoints by role: in P/D, prefill-capable ones serve prefill, the others decode."""
        if served.prefill is None:
            served.main.set_endpoints(endpoints)
            return
        served.prefill.set_endpoints([e for e in endpoints if e.role in ("prefill", "both")])
        served.main.set_endpoints([e for e in endpoints if e.role in ("decode", "both")])

    def _discovered_pods(self, served: Served, role: str, endpoints: list[Endpoint]) -> None:
        self._discovered[(served.config.name, role)] = endpoints
        merged = [e for (model, _), eps in sorted(self._discovered.items()) if model == served.config.name
                  for e in eps]
        self._set_endpoints(served, merged)
        log.info("endpoints discovered", extra={"model": served.config.name, "role": role,
                                                "endpoints": [e.name for e in endpoints]})

    # -- request entry points -------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        model_name = "unknown"
        try:
            body = await self._parse(request)
            model_name = str(body["model"])
            served = self.models[model_name]
            prompt = self._prompt(body, chat)
            cfg = served.config
            view = RequestView(rid, token_count(prompt), block_hashes(prompt, cfg.block_size, cfg.max_hashed_blocks),
                               time.monotonic())
            index = self.kv_indexes.get(model_name)
            if index is not None:   # chat: rendered with the model's own template, as the engine does
                view.engine_blocks = index.chat_keys(body.get("messages")) if chat else index.prompt_keys(prompt)
            self.handovers.observe(model_name, view, prompt)
            path = "/v1/chat/completions" if chat else "/v1/completions"
            if served.prefill is not None:
                body = await self._prefill(served, view, path, body)
            resp = await self._forward(request, served, served.main, view, path, body, "decode"
                                       if served.prefill is not None else "main")
            self.metrics.requests.labels(model_name, "ok").inc()
            return resp
        except ApiError as e:
            self.metrics.requests.labels(model_name, f"error_{e.status}").inc()
            if e.status >= 500:
                log.warning("request failed: %s", e.message,
                            extra={"request_id": rid, "model": model_name, "status": e.status})
            return e.response()

    async def _parse(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > self.cfg.max_body_bytes:
            raise ApiError(413, f"request body exceeds {self.cfg.max_body_bytes} bytes")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"request body exceeds {self.cfg.max_body_bytes} bytes") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter", param="model")
        if model not in self.models:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")
        return body

    @staticmethod
    def _prompt(body: dict[str, Any], chat: bool) -> str:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise ApiError(400, "messages must be a non-empty list of message objects", param="messages")
            return render_chat(messages)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        return prompt

    # -- dispatch --------------------------------------------------------------------------
    async def _pick(self, served: Served, pool: Pool, view: RequestView, role: str,
                    tried: frozenset[str]) -> Member:
        """The endpoint for this attempt; with a holding policy, after waiting in its queue."""
        name = served.config.name
        try:
            chosen = await pool.admit(view, tried)
        except QueueFull:
            raise ApiError(429, f"the router's queue for model `{name}` is full; retry later",
                           "rate_limit_exceeded", retry_after=RETRY_AFTER_S) from None
        except NoEndpoint:
            chosen = None
        if chosen is None:
            if pool.saturated():
                raise ApiError(429, f"all endpoints of model `{name}` are at their limit; retry later",
                               "rate_limit_exceeded", retry_after=RETRY_AFTER_S)
            raise ApiError(503, f"no healthy endpoint for model `{name}`", "service_unavailable",
                           retry_after=RETRY_AFTER_S)
        member, reason = chosen
        self.metrics.decisions.labels(name, role, reason).inc()
        self.timelines[name].decided(reason, new_request=not tried and role != "decode")
        return member

    def _attempt_failed(self, served: Served, pool: Pool, member: Member, why: str, rid: str) -> None:
        name = served.config.name
        self.metrics.upstream_errors.labels(name, member.endpoint.name).inc()
        if pool.failed(member):
            self.metrics.breaker_opened.labels(name, member.endpoint.name).inc()
            log.warning("circuit breaker opened", extra={"endpoint": member.endpoint.name, "model": name})
        log.info("upstream attempt failed: %s", why,
                 extra={"request_id": rid, "endpoint": member.endpoint.name, "model": name})

    async def _prefill(self, served: Served, view: RequestView, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run the prefill half of P/D; returns the decode request's body."""
        assert served.prefill is not None and self.session is not None
        pool = served.prefill
        prefill_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        prefill_body.update(max_tokens=1, stream=False,
                            kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False})
        prefill_body.pop("max_completion_tokens", None)
        tried: frozenset[str] = frozenset()
        for attempt_no in range(self.cfg.max_retries + 1):
            member = await self._pick(served, pool, view, "prefill", tried)
            attempt = Attempt(pool, member, view)
            started = time.monotonic()
            try:
                async with self.session.post(member.url + path, json=prefill_body) as up:
                    payload = await up.read()
                    if up.status >= 500:
                        raise UpstreamFailed(f"HTTP {up.status}")
                    if up.status >= 400:
                        attempt.status = "rejected"
                        raise _passthrough_error(up.status, payload)
                    params = json.loads(payload).get("kv_transfer_params")
                attempt.first_token(time.monotonic() - started)
                attempt.status = "ok"
                pool.succeeded(member)
                view.prefill_instance = member.endpoint.name   # the decode half is paired with it
                return {**body, "kv_transfer_params": params}
            except (TimeoutError, UpstreamFailed, aiohttp.ClientError) as e:
                attempt.status = "failed"
                self._attempt_failed(served, pool, member, str(e) or type(e).__name__, view.request_id)
                tried |= {member.endpoint.name}
                if attempt_no < self.cfg.max_retries:
                    self.metrics.retries.labels(served.config.name).inc()
            finally:
                attempt.end()
        raise ApiError(502, f"prefill failed on {len(tried)} endpoint(s) of model `{served.config.name}`",
                       "upstream_error", retry_after=RETRY_AFTER_S)

    async def _forward(self, request: web.Request, served: Served, pool: Pool, view: RequestView, path: str,
                       body: dict[str, Any], role: str) -> web.StreamResponse:
        assert self.session is not None
        stream = bool(body.get("stream"))
        tried: frozenset[str] = frozenset()
        for attempt_no in range(self.cfg.max_retries + 1):
            member = await self._pick(served, pool, view, role, tried)
            attempt = Attempt(pool, member, view)
            self.metrics.inflight.labels(served.config.name, member.endpoint.name).inc()
            try:
                if stream:
                    return await self._relay_stream(request, served, attempt, path, body)
                return await self._relay_whole(attempt, path, body)
            except (TimeoutError, UpstreamFailed, aiohttp.ClientError) as e:
                attempt.status = "failed"
                self._attempt_failed(served, pool, member, str(e) or type(e).__name__, view.request_id)
                tried |= {member.endpoint.name}
                if attempt_no < self.cfg.max_retries:
                    self.metrics.retries.labels(served.config.name).inc()
            finally:
                attempt.end()
                self.metrics.inflight.labels(served.config.name, member.endpoint.name).dec()
        raise ApiError(502, f"request failed on {len(tried)} endpoint(s) of model `{served.config.name}`",
                       "upstream_error", retry_after=RETRY_AFTER_S)

    async def _relay_whole(self, attempt: Attempt, path: str, body: dict[str, Any]) -> web.Response:
        assert self.session is not None
        member, view = attempt.member, attempt.request
        async with self.session.post(member.url + path, json=body) as up:
            payload = await up.read()
            if up.status >= 500:
                raise UpstreamFailed(f"HTTP {up.status}")
            if up.status >= 400:
                attempt.status = "rejected"
            else:
                attempt.first_token(None)
                attempt.status = "ok"
            attempt.pool.succeeded(member)
            return web.Response(body=payload, status=up.status, content_type="application/json",
                                headers={"X-Kvpilot-Endpoint": member.endpoint.name,
                                         "X-Request-Id": view.request_id})

    async def _relay_stream(self, request: web.Request, served: Served, attempt: Attempt, path: str,
                            body: dict[str, Any]) -> web.StreamResponse:
        assert self.session is not None
        pool, member, view = attempt.pool, attempt.member, attempt.request
        started = time.monotonic()
        resp: web.StreamResponse | None = None
        chunks = 0
        first_at = 0.0
        headers = self.migrator.headers(served.config.name, view.request_id)
        up_body = self.migrator.upstream_body(served.config.name, body)
        async with self.session.post(member.url + path, json=up_body, headers=headers) as up:
            if up.status >= 500:
                raise UpstreamFailed(f"HTTP {up.status}")
            if up.status >= 400:
                attempt.status = "rejected"
                return web.Response(body=await up.read(), status=up.status, content_type="application/json")
            try:
                async for data in self.migrator.relay(up, view.request_id, served.config.name, pool, member,
                                                      view.prompt_tokens, body):
                    if resp is None:
                        first_at = time.monotonic()
                        attempt.first_token(first_at - started)
                        self.metrics.ttft.labels(served.config.name).observe(first_at - view.arrival)
                        self.timelines[served.config.name].first_token(first_at - view.arrival)
                        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache",
                                                           "X-Kvpilot-Endpoint": member.endpoint.name,
                                                           "X-Request-Id": view.request_id})
                        await resp.prepare(request)
                    chunks += 1
                    await resp.write(data)
            except (TimeoutError, aiohttp.ClientError) as e:
                if resp is None:
                    raise
                # Past the first byte no retry is possible: end the stream with an explicit error.
                attempt.status = "failed"
                self._attempt_failed(served, pool, member, f"mid-stream: {e or type(e).__name__}", view.request_id)
                err = ApiError(502, f"upstream {member.endpoint.name} failed mid-stream", "upstream_error")
                await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
                await resp.write_eof()
                return resp
            if resp is None:
                raise UpstreamFailed("upstream closed the stream before any data")
            attempt.status = "ok"
            pool.succeeded(member)
            if chunks > 1:
                tpot = (time.monotonic() - first_at) / (chunks - 1)
                self.metrics.tpot.labels(served.config.name).observe(tpot)
                self.timelines[served.config.name].tpot(tpot)
            await resp.write_eof()
            return resp

    # -- other endpoints -------------------------------------------------------------------
    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "kvpilot"} for name in self.models]})

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=page(), content_type="text/html")

    async def dashboard_data(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        models = []
        for name, s in self.models.items():
            members = {m.endpoint.name: m for pool in (s.prefill, s.main) if pool is not None for m in pool.members}
            endpoints = [{"name": m.endpoint.name, "role": m.endpoint.role, "in_flight": m.load.in_flight,
                          "pending_prefill_tokens": m.load.pending_prefill_tokens,
                          "engine_running": m.load.engine_running, "engine_waiting": m.load.engine_waiting,
                          "kv_usage": m.load.kv_usage, "breaker_open": m.breaker.is_open(now),
                          "cache_hits": self._cache_counters.get(m.url, (0.0, 0.0))[0],
                          "cache_queries": self._cache_counters.get(m.url, (0.0, 0.0))[1]}
                         for m in members.values()]
            models.append({"name": name, "policy": s.config.policy, "slo_ttft_s": s.config.slo_ttft_ms / 1000,
                           "slo_tpot_s": s.config.slo_tpot_ms / 1000, "endpoints": endpoints,
                           "series": self.timelines[name].series(), "scaling": self.scaling_events.get(name, []),
                           "migrations": list(self.migrator.recent.get(name, ()))})
        return web.json_response({"models": models})

    async def kv_match(self, request: web.Request) -> web.Response:
        """What the KV-event index says each instance holds of a prompt (`{"model", "prompt"}`, or
        `{"model", "messages"}` for a chat): for checking the router's view against the engines'."""
        body = await request.json()
        index = self.kv_indexes.get(str(body.get("model")))
        if index is None:
            return web.json_response({"error": "model does not follow KV events"}, status=404)
        if "messages" in body:
            keys = index.chat_keys(body["messages"])
        else:
            keys = index.prompt_keys(str(body.get("prompt", "")))
        view = RequestView("kv-match", 0, [], engine_blocks=keys)
        return web.json_response({"prompt_blocks": len(view.engine_blocks), "blocks": index.summary(),
                                  "cached_tokens": {n: index.cached_tokens(n, view) for n in index.instances}})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ready(self, request: web.Request) -> web.Response:
        missing = [name for name, s in self.models.items()
                   if not s.main.healthy() or (s.prefill is not None and not s.prefill.healthy())]
        if missing:
            return web.Response(status=503, text=f"no healthy endpoints for: {', '.join(missing)}")
        return web.Response(text="ready")

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        for name, s in self.models.items():
            for role, pool in (("main", s.main), ("prefill", s.prefill)):
                if pool is not None:
                    self.metrics.members.labels(name, role).set(len(pool.healthy()))
            for role, pool in self._roles(s):
                estimate = pool.policy.cache_estimate()
                if estimate is not None:
                    for m in pool.members:
                        if m.endpoint.name in estimate.token_s:
                            self.metrics.prefill_token_s.labels(name, role, m.endpoint.name).set(
                                estimate.token_s[m.endpoint.name])
                if pool.holder is not None:
                    depths = pool.queued()
                    for m in pool.members:
                        self.metrics.queue_depth.labels(name, role, m.endpoint.name).set(depths.get(m.endpoint.name, 0))
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- engine metrics scraping -------------------------------------------------------------
    def _poll_files(self) -> None:
        for name, f in self._files.items():
            doc = f.poll()
            if doc is not None:
                self._set_endpoints(self.models[name], doc.endpoints)
                self.scaling_events[name] = doc.events[-50:]

    async def _hold_loop(self) -> None:
        """The periodic tick of the router-side queues: rebalance hot spots and release what the
        clock alone makes releasable (the starvation bound), even when no event arrives."""
        holding = [p for s in self.models.values() for _, p in self._roles(s) if p.holder is not None]
        if not holding:
            return
        tick, threshold = self.cfg.hold_tick_s, self.cfg.hold_bypass_lag_s
        gate = LagGate(threshold, calm_ticks=math.ceil(1.0 / tick))   # back to holding after 1 s of calm
        while True:
            due = time.monotonic() + tick
            await asyncio.sleep(tick)
            now = time.monotonic()
            lag = now - due
            self.metrics.loop_lag.set(lag)
            if threshold > 0 and gate.update(lag) != holding[0].bypass:
                for pool in holding:
                    pool.set_bypass(gate.on)
                self.metrics.hold_bypassed.set(int(gate.on))
                log.log(logging.WARNING if gate.on else logging.INFO, "event loop %.0f ms late: router-side "
                        "queues %s", lag * 1000, "bypassed for new requests" if gate.on else "back in use")
            for pool in holding:
                if pool.waiting:
                    pool.pump(now)

    async def _scrape_loop(self) -> None:
        while True:
            self._poll_files()
            for name, s in self.models.items():
                self.timelines[name].members(sum(len(p.members) for p in (s.main, s.prefill) if p is not None))
            await asyncio.gather(*(self._scrape(s, pool, m) for s in self.models.values()
                                   for pool in (s.main, s.prefill) if pool is not None for m in pool.members))
            await asyncio.sleep(self.cfg.scrape_interval_s)

    async def _scrape(self, served: Served, pool: Pool, member: Member) -> None:
        """Engine load signals (vLLM metric names) into the member's load; an unreachable
        endpoint counts as a failure, so a dead worker leaves the ring without traffic."""
        assert self.session is not None
        try:
            async with self.session.get(member.url + "/metrics") as resp:
                text = await resp.text()
            if resp.status != 200:
                raise UpstreamFailed(f"/metrics HTTP {resp.status}")
        except (TimeoutError, UpstreamFailed, aiohttp.ClientError) as e:
            self._attempt_failed(served, pool, member, f"scrape: {e or type(e).__name__}", "-")
            return
        load = member.load
        for family in text_string_to_metric_families(text):
            if family.name == "vllm:num_requests_running":
                load.engine_running = int(sum(s.value for s in family.samples))
            elif family.name == "vllm:num_requests_waiting":
                load.engine_waiting = int(sum(s.value for s in family.samples))
            elif family.name == "vllm:kv_cache_usage_perc":
                load.kv_usage = max((s.value for s in family.samples), default=0.0)
            elif family.name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
                total = sum(s.value for s in family.samples if s.name.endswith("_total"))
                hits, queries = self._cache_counters.get(member.url, (0.0, 0.0))
                self._cache_counters[member.url] = \
                    (total, queries) if family.name.endswith("hits") else (hits, total)

    # -- lifecycle ---------------------------------------------------------------------------
    async def _on_startup(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, sock_connect=self.cfg.connect_timeout_s)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        self._scraper = asyncio.create_task(self._scrape_loop())
        self._holder = asyncio.create_task(self._hold_loop())
        for name, index in self.kv_indexes.items():
            kv = self.models[name].config.kv_events
            assert kv is not None
            self._kv_tasks.append(asyncio.create_task(index.listen(kv.bind)))
        self.migrator.start(self.session)
        self.handovers.start(self.session)
        loop = asyncio.get_running_loop()
        for served in self.models.values():
            d = served.config.discovery
            if d is None:
                continue
            for role, selector in d.pools.items():
                def publish(eps: list[Endpoint], served: Served = served, role: str = role) -> None:
                    self._discovered_pods(served, role, eps)

                watcher = PodWatcher(d.namespace, selector, d.port, role, publish, loop)
                watcher.start()
                self._watchers.append(watcher)

    async def _on_cleanup(self, app: web.Application) -> None:
        for watcher in self._watchers:
            watcher.stop()
        if self._scraper is not None:
            self._scraper.cancel()
        if self._holder is not None:
            self._holder.cancel()
        for task in self._kv_tasks:
            task.cancel()
        self.migrator.stop()
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/dashboard", self.dashboard)
        app.router.add_get("/dashboard/data", self.dashboard_data)
        app.router.add_post("/debug/kv-match", self.kv_match)
        app.router.add_post("/kvpilot/migrate", self.migrator.handle)
        app.router.add_post("/kvpilot/handover", self.handovers.handle)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app


def _passthrough_error(status: int, payload: bytes) -> ApiError:
    """An upstream 4xx becomes the client's 4xx with the upstream's message."""
    try:
        err = json.loads(payload)["error"]
        return ApiError(status, str(err.get("message", "")), str(err.get("type", "invalid_request_error")),
                        err.get("param"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return ApiError(status, payload.decode(errors="replace")[:500])


def serve(cfg: RouterConfig) -> None:
    import uvloop

    uvloop.install()
    logs.setup(cfg.log_level, cfg.log_format)
    web.run_app(Router(cfg).app(), host=cfg.host, port=cfg.port, access_log=None, print=None,
                handler_cancellation=True)
