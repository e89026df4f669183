"""Request handling: the OpenAI-compatible surface of `kvpilot router`.

A request is validated here (JSON body, model, then every OpenAI field's type and range against
`kvpilot.router.openai_schema`, prompt or messages), turned into what its
policy sees (`ModelRuntime.request_view`), and handed to dispatch; every failure on the way is
an `ApiError`, which the client gets as OpenAI's error JSON. Nothing here knows about pools,
retries or upstreams.

Cross-cutting request concerns (API keys and per-key limits: `kvpilot.router.auth`; tracing) are
aiohttp middlewares passed to `build_app` (`kvpilot.router.proxy`): they wrap these handlers and
see the request before its body is read. `public_routes` are what clients call; the operators'
endpoints (`kvpilot.router.admin`) are served on the admin listener, not here.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from aiohttp import web

from kvpilot.openai_errors import ApiError
from kvpilot.router.dispatch import STREAM_ENDED, Dispatcher
from kvpilot.router.openai_schema import sequences, validate
from kvpilot.router.runtime import Runtime
from kvpilot.tokens import render_chat

log = logging.getLogger("kvpilot.router")


async def read_body(request: web.Request, max_body_bytes: int, models: dict[str, Any]) -> dict[str, Any]:
    """The request's JSON object, with a `model` this router serves."""
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise ApiError(413, f"request body exceeds {max_body_bytes} bytes")
    try:
        body = await request.json()
    except (ValueError, RecursionError, LookupError):
        # ValueError: broken JSON or text (UnicodeDecodeError); RecursionError: nesting too deep for
        # json.loads; LookupError: a charset Python does not know in the Content-Type.
        raise ApiError(400, "request body is not valid JSON") from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body exceeds {max_body_bytes} bytes") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    if model not in models:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")
    return body


def prompt_of(body: dict[str, Any], chat: bool) -> str:
    """The prompt text: a completion's `prompt`, or a chat's messages rendered (kvpilot's template)."""
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


class Api:
    """The handlers clients call."""

    def __init__(self, runtime: Runtime, dispatcher: Dispatcher) -> None:
        self.runtime = runtime
        self.dispatcher = dispatcher
        self.max_body_bytes = runtime.cfg.max_body_bytes

    def public_routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.list_models),
                web.get("/health", self.health),
                web.get("/ready", self.ready)]

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        model_name = "unknown"
        metrics = self.runtime.metrics
        try:
            body = await read_body(request, self.max_body_bytes, self.runtime.models)
            model_name = str(body["model"])
            model = self.runtime.models[model_name]
            req = validate(body, chat)
            if sequences(req) > 1 and (model.config.engine != "vllm" or model.config.mode != "aggregated"):
                raise ApiError(400, "n: more than one choice per request is served only by vLLM engines in "
                                    "aggregated mode; send one request per choice", param="n")
            prompt = prompt_of(body, chat)
            try:
                view = model.request_view(rid, prompt)   # encodes the whole prompt to UTF-8
            except UnicodeEncodeError:
                param = "messages" if chat else "prompt"
                raise ApiError(400, f"{param}: not valid Unicode text (a lone surrogate)", param=param) from None
            await model.engine_keys(view, prompt, body.get("messages") if chat else None)
            self.runtime.handovers.observe(model_name, view, prompt, chat)
            path = "/v1/chat/completions" if chat else "/v1/completions"
            resp = await self.dispatcher.run(request, model, view, path, body)
            metrics.requests.labels(model_name, "ok").inc()
            return resp
        except asyncio.CancelledError:
            # The client went away. After a stream's last byte it may close before the handler
            # returns (the upstream connection is still being released): that request was answered.
            metrics.requests.labels(model_name, "ok" if request.get(STREAM_ENDED) else "cancelled").inc()
            raise
        except ApiError as e:
            metrics.requests.labels(model_name, f"error_{e.status}").inc()
            if e.status >= 500:
                log.warning("request failed: %s", e.message,
                            extra={"request_id": rid, "model": model_name, "status": e.status})
            return e.response()

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "kvpilot"} for name in self.runtime.models]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ready(self, request: web.Request) -> web.Response:
        missing = [name for name, m in self.runtime.models.items() if not all(p.healthy() for p in m.pools())]
        if missing:
            return web.Response(status=503, text=f"no healthy endpoints for: {', '.join(missing)}")
        return web.Response(text="ready")
