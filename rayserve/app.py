"""A Ray Serve app on the simulator: engine replicas and an OpenAI-compatible ingress.

`SimEngine` runs kvpilot's engine model in real time inside a Serve replica: the same `SimServer`
engine loop as `kvpilot sim serve`, with its vLLM-named metrics (`metrics()`) and, for the
router, `record_routing_stats` in vLLM's names. `Ingress` serves `/v1/completions` (streaming
SSE or whole) through Serve's HTTP proxy and calls the engine through a `DeploymentHandle` with
the prompt as a plain argument, the only place a Serve request router can see it.

Each response carries the replica's own prefix-cache counters (`kvpilot` in the last chunk of a
stream, or beside `usage`), so a client can tell where a request ran and what that replica's cache
did. No `from __future__ import annotations` here: FastAPI reads the route methods' annotations at
run time, and behind `serve.ingress` string annotations left `request: Request` a query parameter.
"""

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from kvpilot import sse
from kvpilot.openai_errors import ApiError
from kvpilot.ray.adapter import STAT_KV_USAGE, STAT_RUNNING, STAT_SAMPLED_AT, STAT_WAITING
from kvpilot.ray.prompt import CompletionCall
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.server import ServeConfig, SimServer
from kvpilot.sim.streams import take_tokens

ROUTER_CLASS = "kvpilot.ray.router.KvpilotRouter"


class SimEngine:
    """One simulated engine (a Serve replica). Methods are called through a DeploymentHandle."""

    def __init__(self, profile: str = "h100-llama3-8b", model: str = "sim-model", time_scale: float = 1.0,
                 kv_capacity_tokens: int | None = None) -> None:
        self.server = SimServer(ServeConfig(profile=get_profile(profile), model=model, time_scale=time_scale,
                                            kv_capacity_tokens=kv_capacity_tokens))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._started = False

    def _start(self) -> None:
        if not self._started:   # on the replica's event loop, which __init__ may not run on
            self.server.start()
            self._started = True

    def counters(self) -> dict[str, Any]:
        c = self.server.engine.counters
        return {"replica": self.replica, "prefix_cache_hits": c.prefix_cache_hits,
                "prefix_cache_queries": c.prefix_cache_queries, "request_success": c.request_success}

    async def generate(self, call: CompletionCall) -> AsyncIterator[dict[str, Any]]:
        """Stream one completion: `{"text"}` pieces as the engine makes tokens, then a last item
        with `usage` and this replica's counters."""
        self._start()
        server = self.server
        stream = server.open_stream(call.prompt, call.max_tokens)
        try:
            sent = 0
            while True:
                count, item = await take_tokens(stream)
                if count:
                    yield {"text": server.text(stream, sent, count)}
                    sent += count
                if item is None:
                    break
            yield {"usage": server.usage(stream.seq), "kvpilot": self.counters()}
        finally:
            server.close_stream(stream)

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve's controller and handed to every router as `routing_stats`; the time
        lets a router tell which of its requests this sample shows started."""
        engine = self.server.engine
        return {STAT_RUNNING: engine.num_running, STAT_WAITING: engine.num_waiting,
                STAT_KV_USAGE: engine.kv_usage, STAT_SAMPLED_AT: time.time(), **self.counters()}

    def metrics(self) -> str:
        """This replica's Prometheus exposition, with vLLM's metric names."""
        return generate_latest(self.server.registry).decode()


api = FastAPI()


def _event(cid: str, model: str, created: int, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    return sse.event({"id": cid, "object": "text_completion", "created": created, "model": model,
                      "choices": choices, **extra})


def _choice(text: str, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}


@serve.ingress(api)
class Ingress:
    """OpenAI `/v1/completions` in front of the engine deployment."""

    def __init__(self, engine: DeploymentHandle[Any], model: str = "sim-model") -> None:
        self.engine = engine
        self.model = model

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model",
                                                          "owned_by": "kvpilot-sim"}]})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        body = await request.json()
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            return JSONResponse(ApiError(400, "prompt must be a non-empty string", param="prompt").body(),
                                status_code=400)
        max_tokens = body.get("max_tokens") or 16
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return JSONResponse(ApiError(400, "max_tokens must be a positive integer", param="max_tokens").body(),
                                status_code=400)
        call = CompletionCall(prompt, max_tokens)
        items = cast(DeploymentResponseGenerator[dict[str, Any]],
                     self.engine.options(stream=True).generate.remote(call))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            return StreamingResponse(self._sse(items, cid, created), media_type="text/event-stream")
        text, last = "", {}
        async for item in items:
            text += item.get("text", "")
            last = item
        return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": self.model,
                             "choices": [_choice(text, "length")],
                             "usage": last.get("usage"), "kvpilot": last.get("kvpilot")})

    async def _sse(self, items: DeploymentResponseGenerator[dict[str, Any]], cid: str,
                   created: int) -> AsyncIterator[bytes]:
        async for item in items:
            if "text" in item:
                yield _event(cid, self.model, created, [_choice(item["text"], None)])
            else:   # the end: like vLLM, a finish chunk, then usage (here always, with the replica's counters)
                yield _event(cid, self.model, created, [_choice("", "length")])
                yield _event(cid, self.model, created, [], usage=item["usage"], kvpilot=item["kvpilot"])
        yield sse.DONE


def build_app(*, replicas: int = 4, router: str | None = "dualmap", profile: str = "h100-llama3-8b",
              time_scale: float = 1.0, max_ongoing_requests: int = 8, slo_ttft_s: float = 5.0,
              router_class: str = ROUTER_CLASS, router_kwargs: dict[str, Any] | None = None,
              stats_period_s: float = 1.0, model: str = "sim-model", ingress_max_ongoing: int = 1000,
              router_log_level: str | None = None) -> Application:
    """The app: `Ingress` → `SimEngine` × `replicas`. `router`: a kvpilot policy name on the engine
    deployment's handle (`router_class`/`router_kwargs` for any other Serve router), or None for
    Serve's default (power of two choices); `router_log_level` "DEBUG" traces its decisions
    (`KvpilotRouter`). Replicas ask for no CPU, so an app fits a 2-CPU Ray."""
    options: dict[str, Any] = {"num_replicas": replicas, "max_ongoing_requests": max_ongoing_requests,
                               "ray_actor_options": {"num_cpus": 0}}
    if router is not None or router_class != ROUTER_CLASS:
        engine_profile = get_profile(profile)   # the router's shadow caches hold what the engines can
        kwargs = router_kwargs if router_kwargs is not None else {
            "policy": router, "slo_ttft_s": slo_ttft_s, "time_scale": time_scale,
            "block_size": engine_profile.block_size, "kv_capacity_tokens": engine_profile.kv_capacity_tokens,
            "log_level": router_log_level}
        router_config: dict[str, Any] = {"request_router_class": router_class, "request_router_kwargs": kwargs,
                                         "request_routing_stats_period_s": stats_period_s}
        options["request_router_config"] = RequestRouterConfig(**router_config)
    engine = serve.deployment(name="SimEngine", **options)(SimEngine).bind(
        profile=profile, model=model, time_scale=time_scale)
    # Serve's default of 5 ongoing requests per replica would make the one ingress the queue.
    ingress = serve.deployment(name="Ingress", max_ongoing_requests=ingress_max_ongoing,
                               ray_actor_options={"num_cpus": 0})(Ingress)
    return ingress.bind(engine, model=model)


def from_args(args: dict[str, Any]) -> Application:
    """`build_app` as a Serve application builder (`import_path: kvpilot.ray.app:from_args` in a Serve
    config or KubeRay's `serveConfigV2`, with `build_app`'s keyword arguments under `args`): Serve
    calls a builder with the one `args` dict."""
    return build_app(**args)
