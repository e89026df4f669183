"""`kvpilot sim serve`: the engine model behind vLLM's HTTP interface, in real time.

One asyncio task runs the engine: schedule a step, sleep for its modelled duration (divided by
`time_scale`), commit it, hand each sampled token to its request's stream. Requests join at the
next step boundary, as in vLLM. Engine time is wall time × `time_scale`, and every latency
this server reports (metrics, usage) is in engine time, so a 10× run reports what the GPU would.

Generated text is deterministic: token i of a response is a word chosen by (prompt hash, i),
so the same request gives the same output on any instance (what migration tests compare).
Like vLLM with `ignore_eos`, every request generates exactly `max_tokens` tokens.

Live migration (`kvpilot.sim.migration`): a streaming request opened with
`X-Kvpilot-Migratable: 1` can be moved to another instance mid-decode; its stream here then ends
with an `event: kvpilot.migrated` naming where it continues, which the router splices away.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from kvpilot.kvtransfer import protocol
from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.store import open_store
from kvpilot.openai_errors import ApiError
from kvpilot.sim import responses
from kvpilot.sim.engine import Engine
from kvpilot.sim.kv_connector import KVConnector, LocalKVConnector, StoreKVConnector
from kvpilot.sim.metrics import EngineCollector
from kvpilot.sim.profiles import Profile
from kvpilot.sim.sequence import Phase, Sequence
from kvpilot.sim.streams import Stream
from kvpilot.sim.token_ids import decode_prompt, encode
from kvpilot.tokens import block_hashes, chain_hash, render_chat, token_count
from kvpilot.vllm_metrics import ITL_BUCKETS, LATENCY_BUCKETS

MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(slots=True)
class ServeConfig:
    profile: Profile
    model: str = "sim-model"
    host: str = "127.0.0.1"
    port: int = 8000
    time_scale: float = 1.0
    block_size: int | None = None
    kv_capacity_tokens: int | None = None
    max_model_len: int = 131072
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Fault knobs for tests of retries, breakers and failure handling.
    error_rate: float = 0.0                 # share of requests answered 500 before any work
    crash_after_tokens: int | None = None   # the process exits after generating this many tokens
    slow_start_s: float = 0.0               # /health answers 503 until then
    kv_store: str | None = None             # redis://… : P/D moves real KV bytes through it
    seed: int = 0


class Extension(Protocol):
    """Endpoints beside the OpenAI API (live migration, prefix handover), built with the server and
    using only its public parts, so the server imports none of them (`kvpilot.sim.worker` wires them)."""

    def add_routes(self, app: web.Application) -> None: ...

    async def close(self) -> None: ...


class SimServer:
    def __init__(self, cfg: ServeConfig, connector: KVConnector | None = None,
                 extensions: Iterable[Callable[[SimServer], Extension]] = ()) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg.profile, block_size=cfg.block_size, kv_capacity_tokens=cfg.kv_capacity_tokens)
        self.block_size = self.engine.block_size
        self.connector = connector or self._connector()
        self.streams: dict[Sequence, Stream] = {}
        self.by_request_id: dict[str, Stream] = {}   # the client's X-Request-Id → stream (migration)
        self.rng = random.Random(cfg.seed)
        self.started = time.monotonic()
        self._t0 = time.monotonic()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tokens_generated = 0
        self.registry = CollectorRegistry()
        labels = {"model_name": cfg.model, "engine": "0"}
        self.registry.register(EngineCollector(self.engine, labels))
        names = ["model_name", "engine"]
        buckets = LATENCY_BUCKETS
        self.h_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", names,
                                registry=self.registry, buckets=buckets).labels(**labels)
        self.h_itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", names,
                               registry=self.registry, buckets=ITL_BUCKETS).labels(**labels)
        self.h_e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", names,
                               registry=self.registry, buckets=buckets).labels(**labels)
        self.c_kv_bytes = Counter("vllm:nixl_bytes_transferred", "KV bytes received from remote instances.",
                                  names, registry=self.registry).labels(**labels)
        self.c_kv_failed = Counter("vllm:nixl_num_failed_transfers", "KV imports that failed (recomputed).",
                                   names, registry=self.registry).labels(**labels)
        self.h_queue = Histogram("vllm:request_queue_time_seconds", "Time spent waiting.", names,
                                 registry=self.registry, buckets=buckets).labels(**labels)
        self.extensions = [make(self) for make in extensions]

    def _connector(self) -> KVConnector:
        cfg = self.cfg
        if cfg.kv_store:
            agent = KVAgent(cfg.engine_id, open_store(cfg.kv_store, namespace="sim"))
            return StoreKVConnector(agent, cfg.engine_id, cfg.host, cfg.port, cfg.profile.kv_bytes_per_token)
        return LocalKVConnector(cfg.engine_id, cfg.host, cfg.port, cfg.profile.kv_bytes_per_token, cfg.time_scale)

    # -- clock and engine loop -------------------------------------------------------------
    def wake(self) -> None:
        """New work for the engine loop (a request added, adopted or resumed)."""
        self._wake.set()

    def now(self) -> float:
        """Engine time: wall time since start × time_scale."""
        return (time.monotonic() - self._t0) * self.cfg.time_scale

    async def _run_engine(self) -> None:
        engine, scale = self.engine, self.cfg.time_scale
        while True:
            if not engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            start = self.now()
            plan = engine.schedule(start)
            if plan is None:  # nothing runnable (cannot happen with admission checks); avoid spinning
                await asyncio.sleep(0.001)
                continue
            await asyncio.sleep(max(0.0, start + plan.duration() - self.now()) / scale)
            end = self.now()
            for seq in engine.commit(plan, end):
                self._deliver(seq, end)

    def _deliver(self, seq: Sequence, t: float) -> None:
        stream = self.streams.get(seq)
        if stream is None:
            return
        if seq.output == 1:
            self.h_ttft.observe(t - seq.arrival)
            if seq.first_scheduled is not None:
                self.h_queue.observe(seq.first_scheduled - seq.arrival)
        elif stream.last_token_engine_t is not None:
            self.h_itl.observe(t - stream.last_token_engine_t)
        stream.last_token_engine_t = t
        stream.queue.put_nowait(1)
        if seq.phase == Phase.FINISHED:
            self.h_e2e.observe(t - seq.arrival)
            stream.queue.put_nowait(None)
        self._tokens_generated += 1
        crash = self.cfg.crash_after_tokens
        if crash is not None and self._tokens_generated >= crash:
            os._exit(17)  # a fault knob: die like a crashed GPU worker, mid-stream

    # -- request handling ------------------------------------------------------------------
    async def _parse(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.cfg.model:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")
        return body

    def _max_tokens(self, body: dict[str, Any], default: int, prompt_tokens: int) -> int:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
        if value is None:
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
        if prompt_tokens + value > self.cfg.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {self.cfg.max_model_len} tokens. "
                                f"However, you requested {prompt_tokens + value} tokens "
                                f"({prompt_tokens} in the messages, {value} in the completion).",
                           param="max_tokens")
        return value

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._parse(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
                try:  # a token-id prompt (vLLM's form; the router's resume migration sends one)
                    text, generated = decode_prompt(prompt, responses.WORDS)
                except ValueError as e:
                    raise ApiError(400, str(e), param="prompt") from None
                return await self._generate(request, body, text, chat=False, ids=prompt, generated=generated)
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "prompt must be a non-empty string or list of token ids", param="prompt")
            return await self._generate(request, body, prompt, chat=False)
        except ApiError as e:
            return e.response()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._parse(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise ApiError(400, "messages must be a non-empty list of message objects", param="messages")
            return await self._generate(request, body, render_chat(messages), chat=True)
        except ApiError as e:
            return e.response()

    async def _generate(self, request: web.Request, body: dict[str, Any], prompt: str, chat: bool,
                        ids: list[int] | None = None, generated: int = 0) -> web.StreamResponse:
        """`ids`: the prompt as given in token ids, ending with `generated` words of this prompt's answer."""
        cfg = self.cfg
        prompt_tokens = len(ids) if ids is not None else token_count(prompt)
        max_tokens = self._max_tokens(body, 256 if chat else 16, prompt_tokens)
        kv_params = body.get("kv_transfer_params") or {}
        if not isinstance(kv_params, dict):
            raise ApiError(400, "kv_transfer_params must be an object", param="kv_transfer_params")
        if cfg.error_rate and self.rng.random() < cfg.error_rate:
            raise ApiError(500, "injected failure (--error-rate)", "InternalServerError")
        external = 0
        if kv_params.get("do_remote_prefill"):
            imported = await self.connector.import_kv(kv_params, prompt_tokens)
            external = imported.tokens
            self.c_kv_bytes.inc(imported.bytes)
            if imported.failed:
                self.c_kv_failed.inc()  # degraded to recompute: the request still completes
        hashes = block_hashes(prompt, self.block_size)
        seq = Sequence(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", self.now(), prompt_tokens, hashes,
                       max_tokens, external_tokens=external)
        try:
            self.engine.add(seq)
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None
        streaming = bool(body.get("stream"))
        seed = (hashes[0] if hashes else chain_hash(0, prompt.encode())) + generated  # greedy: go on at word k
        stream = Stream(seq, seed, chat=chat,
                        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
                        created=int(time.time()),
                        migratable=streaming and request.headers.get(protocol.MIGRATABLE) == "1",
                        prompt_ids=(ids or encode(prompt)) if body.get("return_token_ids") and not chat else None)
        self.streams[seq] = stream
        external_id = request.headers.get(protocol.REQUEST_ID)
        if external_id:
            self.by_request_id[external_id] = stream
        self._wake.set()
        try:
            if streaming:
                return await self.stream_response(request, stream, kv_params)
            return await responses.collect(stream, self.cfg.model, self._kv_out(seq, kv_params))
        finally:
            self.streams.pop(seq, None)
            if external_id and self.by_request_id.get(external_id) is stream:
                del self.by_request_id[external_id]
            if not seq.finished:  # client went away or the handler failed: free the engine's work
                self.engine.abort(seq)

    # -- responses (rendered by kvpilot.sim.responses) ---------------------------------------
    def text(self, stream: Stream, start: int, count: int) -> str:
        """Tokens `start`..`start+count` of a response, as text (deterministic per prompt)."""
        return responses.text(stream, start, count)

    def usage(self, seq: Sequence) -> dict[str, Any]:
        return responses.usage(seq)

    def _kv_out(self, seq: Sequence, kv_params: dict[str, Any]) -> responses.KVOut:
        async def export() -> dict[str, Any] | None:
            if kv_params.get("do_remote_decode"):
                return await self.connector.export(seq.request_id, seq.prompt_tokens, seq.block_hashes)
            return None

        return export

    async def stream_response(self, request: web.Request, stream: Stream,
                              kv_params: dict[str, Any]) -> web.StreamResponse:
        """SSE from `stream.sent` on (0 for a new request, the migration point for a migrated one)."""
        return await responses.stream_sse(request, stream, self.cfg.model, self._kv_out(stream.seq, kv_params))

    # -- other endpoints -------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.cfg.model, "object": "model", "created": int(self.started), "owned_by": "kvpilot-sim",
            "root": self.cfg.model, "max_model_len": self.cfg.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        if time.monotonic() - self.started < self.cfg.slow_start_s:
            return web.Response(status=503, text="starting")
        return web.Response(text="")

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's `POST /reset_prefix_cache` (a dev-mode endpoint there): drop every cached block no
        running request holds, so a benchmark can start each run cold on the same workers instead of
        restarting them. The prefix-cache counters keep counting (they are Prometheus counters)."""
        self.engine.pool.clear()
        return web.Response(text="")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        for extension in self.extensions:
            extension.add_routes(app)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def start(self) -> None:
        """Start the engine loop on the running event loop (the HTTP app does at startup; a host
        without the HTTP app, like the Ray Serve deployment, on its first request)."""
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._run_engine())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def open_stream(self, prompt: str, max_tokens: int) -> Stream:
        """A completion request admitted to the engine without HTTP: its tokens arrive on the
        stream's queue (as for `/v1/completions`); `close_stream` when done or abandoned."""
        hashes = block_hashes(prompt, self.block_size)
        seq = Sequence(f"cmpl-{uuid.uuid4().hex}", self.now(), token_count(prompt), hashes, max_tokens)
        self.engine.add(seq)
        stream = Stream(seq, hashes[0] if hashes else chain_hash(0, prompt.encode()), created=int(time.time()))
        self.streams[seq] = stream
        self._wake.set()
        return stream

    def close_stream(self, stream: Stream) -> None:
        self.streams.pop(stream.seq, None)
        if not stream.seq.finished:  # abandoned: free the engine's work
            self.engine.abort(stream.seq)

    async def _on_startup(self, app: web.Application) -> None:
        self.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        self.stop()
        for extension in self.extensions:
            await extension.close()
        await self.connector.close()
