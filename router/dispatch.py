"""Dispatch: getting one request answered by an endpoint, with retries and P/D.

For each attempt the model's pool picks an endpoint (`Pool.admit`: at once, or after waiting in
a holding policy's queue); the request is forwarded and the answer streamed back chunk by chunk
without buffering. Failures before the first byte reaches the client are retried on another
endpoint, which the pool excludes from that request's next decision; after it, the client gets
an SSE error event. Every attempt ends through `Attempt`, so the policy hears exactly one
outcome per dispatch. In disaggregated mode a request runs vLLM's P/D flow: a prefill request
(`max_tokens=1`, `kv_transfer_params`) to the prefill pool, then the real request with the
returned params to the decode pool, whose pick the policy pairs with the prefill instance.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
from aiohttp import web

from kvpilot import sse
from kvpilot.names import POOL_ROLE_LABEL
from kvpilot.openai_errors import RETRY_AFTER_S, ApiError
from kvpilot.router.policy import RequestView
from kvpilot.router.pool import Attempt, Member, NoEndpoint, Pool, QueueFull
from kvpilot.router.runtime import ModelRuntime, Runtime
from kvpilot.router.wake import ColdStarts, needs_wake

# Set on a request once every event of its streamed response was written: a client that closes
# right after the last one cancels the handler, and the request still counts as answered.
STREAM_ENDED = web.RequestKey("stream_ended", bool)


class UpstreamFailed(Exception):
    """An attempt failed before any byte reached the client: safe to retry elsewhere."""


def passthrough_error(status: int, payload: bytes) -> ApiError:
    """An upstream 4xx becomes the client's 4xx with the upstream's message."""
    try:
        err = json.loads(payload)["error"]
        return ApiError(status, str(err.get("message", "")), str(err.get("type", "invalid_request_error")),
                        err.get("param"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return ApiError(status, payload.decode(errors="replace")[:500])


class Dispatcher:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.max_retries = runtime.cfg.max_retries
        self.session: aiohttp.ClientSession | None = None   # set when the app starts
        cfg = runtime.cfg
        self.cold = ColdStarts(runtime.metrics.registry, cfg.cold_start_queue, cfg.cold_start_timeout_s)

    async def _alive(self, url: str) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def run(self, request: web.Request, model: ModelRuntime, view: RequestView, path: str,
                  body: dict[str, Any]) -> web.StreamResponse:
        """Answer one validated request: prefill first in P/D, then the (decode) request itself.
        While a pool it needs is at zero replicas, it first waits for the pools to wake."""
        pools, cfg = model.pools(), model.config
        dynamic = cfg.discovery is not None or cfg.endpoints_file is not None   # static endpoints never wake
        if dynamic and needs_wake([len(p.members) for p in pools]):
            async def alive(url: str) -> bool:
                """A starting instance that answers: its breaker, opened by scrapes before it listened, closes."""
                if not await self._alive(url):
                    return False
                for p in pools:
                    for m in p.members:
                        if m.url == url and m.breaker.open_until:
                            p.revive(m)
                return True

            await self.cold.hold(model.name, [role for role, _ in model.roles()],
                                 lambda: [[m.url for m in p.members] for p in pools], alive)
        if model.prefill is not None:
            body = await self._prefill(model, model.prefill, view, path, body)
            return await self._forward(request, model, model.main, view, path, body, POOL_ROLE_LABEL["decode"])
        return await self._forward(request, model, model.main, view, path, body, POOL_ROLE_LABEL["aggregated"])

    async def _pick(self, model: ModelRuntime, pool: Pool, view: RequestView, role: str,
                    tried: frozenset[str]) -> Member:
        """The endpoint for this attempt; with a holding policy, after waiting in its queue."""
        name = model.name
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
        model.timeline.decided(reason, new_request=not tried and role != "decode")
        return member

    def _failed(self, model: ModelRuntime, attempt: Attempt, error: BaseException, attempt_no: int) -> None:
        attempt.status = "failed"
        self.runtime.attempt_failed(model, attempt.pool, attempt.member, str(error) or type(error).__name__,
                                    attempt.request.request_id)
        if attempt_no < self.max_retries:
            self.metrics.retries.labels(model.name).inc()

    async def _prefill(self, model: ModelRuntime, pool: Pool, view: RequestView, path: str,
                       body: dict[str, Any]) -> dict[str, Any]:
        """Run the prefill half of P/D; returns the decode request's body."""
        prefill_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        prefill_body.update(max_tokens=1, stream=False,
                            kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False})
        prefill_body.pop("max_completion_tokens", None)
        tried: frozenset[str] = frozenset()
        for attempt_no in range(self.max_retries + 1):
            member = await self._pick(model, pool, view, "prefill", tried)
            attempt = Attempt(pool, member, view)
            started = time.monotonic()
            try:
                status, payload = await self._post_whole(attempt, path, prefill_body)
                if status >= 400:
                    raise passthrough_error(status, payload)
                params = json.loads(payload).get("kv_transfer_params")
                attempt.first_token(time.monotonic() - started)
                attempt.status = "ok"
                pool.succeeded(member)
                view.prefill_instance = member.endpoint.name   # the decode half is paired with it
                return {**body, "kv_transfer_params": params}
            except (TimeoutError, UpstreamFailed, aiohttp.ClientError) as e:
                self._failed(model, attempt, e, attempt_no)
                tried |= {member.endpoint.name}
            finally:
                attempt.end()
        raise ApiError(502, f"prefill failed on {len(tried)} endpoint(s) of model `{model.name}`",
                       "upstream_error", retry_after=RETRY_AFTER_S)

    async def _forward(self, request: web.Request, model: ModelRuntime, pool: Pool, view: RequestView, path: str,
                       body: dict[str, Any], role: str) -> web.StreamResponse:
        stream = bool(body.get("stream"))
        tried: frozenset[str] = frozenset()
        inflight = self.metrics.inflight
        for attempt_no in range(self.max_retries + 1):
            member = await self._pick(model, pool, view, role, tried)
            attempt = Attempt(pool, member, view)
            inflight.labels(model.name, member.endpoint.name).inc()
            try:
                if stream:
                    return await self._relay_stream(request, model, attempt, path, body)
                return await self._relay_whole(attempt, path, body)
            except (TimeoutError, UpstreamFailed, aiohttp.ClientError) as e:
                self._failed(model, attempt, e, attempt_no)
                tried |= {member.endpoint.name}
            finally:
                attempt.end()
                inflight.labels(model.name, member.endpoint.name).dec()
        raise ApiError(502, f"request failed on {len(tried)} endpoint(s) of model `{model.name}`",
                       "upstream_error", retry_after=RETRY_AFTER_S)

    async def _post_whole(self, attempt: Attempt, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """POST a request that is answered whole (not streamed) to the attempt's member: (status,
        body). A 5xx is the member failing (UpstreamFailed: the caller retries elsewhere); a 4xx
        marks the attempt rejected (the client's own error, passed through). Shared by the P/D
        prefill half and a whole relay, so both judge an answer alike."""
        assert self.session is not None
        async with self.session.post(attempt.member.url + path, json=body) as up:
            payload = await up.read()
            if up.status >= 500:
                raise UpstreamFailed(f"HTTP {up.status}")
            if up.status >= 400:
                attempt.status = "rejected"
            return up.status, payload

    async def _relay_whole(self, attempt: Attempt, path: str, body: dict[str, Any]) -> web.Response:
        member, view = attempt.member, attempt.request
        status, payload = await self._post_whole(attempt, path, body)
        if status < 400:
            attempt.first_token(None)
            attempt.status = "ok"
        attempt.pool.succeeded(member)
        return web.Response(body=payload, status=status, content_type="application/json",
                            headers={"X-Kvpilot-Endpoint": member.endpoint.name, "X-Request-Id": view.request_id})

    async def _relay_stream(self, request: web.Request, model: ModelRuntime, attempt: Attempt, path: str,
                            body: dict[str, Any]) -> web.StreamResponse:
        assert self.session is not None
        pool, member, view = attempt.pool, attempt.member, attempt.request
        migrator, name = self.runtime.migrator, model.name
        started = time.monotonic()
        resp: web.StreamResponse | None = None
        chunks = 0
        first_at = 0.0
        tail = b""
        async with self.session.post(member.url + path, json=migrator.upstream_body(name, body),
                                     headers=migrator.headers(name, view.request_id)) as up:
            if up.status >= 500:
                raise UpstreamFailed(f"HTTP {up.status}")
            if up.status >= 400:
                attempt.status = "rejected"
                return web.Response(body=await up.read(), status=up.status, content_type="application/json")
            try:
                async for data in migrator.relay(up, view.request_id, name, pool, member, view.prompt_tokens, body):
                    if resp is None:
                        first_at = time.monotonic()
                        attempt.first_token(first_at - started)
                        self.metrics.ttft.labels(name).observe(first_at - view.arrival)
                        model.timeline.first_token(first_at - view.arrival)
                        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache",
                                                           "X-Kvpilot-Endpoint": member.endpoint.name,
                                                           "X-Request-Id": view.request_id})
                        await resp.prepare(request)
                    chunks += 1
                    await resp.write(data)
                    # The client has its answer once `[DONE]` is out, and may close at once while
                    # this relay still waits for the upstream's end (a CI run counted such a stream
                    # `cancelled`). `tail` keeps the sentinel whole across chunk boundaries.
                    tail = (tail + data[-len(sse.DONE):])[-len(sse.DONE):]
                    if tail == sse.DONE:
                        request[STREAM_ENDED] = True
            except (TimeoutError, aiohttp.ClientError) as e:
                if resp is None:
                    raise
                # Past the first byte no retry is possible: end the stream with an explicit error.
                attempt.status = "failed"
                self.runtime.attempt_failed(model, pool, member, f"mid-stream: {e or type(e).__name__}",
                                            view.request_id)
                err = ApiError(502, f"upstream {member.endpoint.name} failed mid-stream", "upstream_error")
                await resp.write(sse.event(err.body()))
                request[STREAM_ENDED] = True
                await resp.write_eof()
                return resp
            if resp is None:
                raise UpstreamFailed("upstream closed the stream before any data")
            attempt.status = "ok"
            pool.succeeded(member)
            if chunks > 1:
                tpot = (time.monotonic() - first_at) / (chunks - 1)
                self.metrics.tpot.labels(name).observe(tpot)
                model.timeline.tpot(tpot)
            # Every event is written (an upstream may end without `[DONE]`): only the chunked body's
            # end is left, and the client's close can cancel the handler inside write_eof.
            request[STREAM_ENDED] = True
            await resp.write_eof()
            return resp
