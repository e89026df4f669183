"""How a simulated request's tokens become an OpenAI response: one JSON body, or SSE chunks.

The server (`kvpilot.sim.server`) admits requests and runs the engine; this module only renders
what a request's `Stream` delivers, in vLLM's shapes: the text of token i is a word chosen by
(prompt seed, i), so every instance renders the same response for the same prompt (what the
migration and resume tests compare); token ids, `usage` with cached tokens, the role chunk sent
with the first token (TTFT is the first body byte), `kv_transfer_params` on the last chunk, and
the `kvpilot.migrated` event when the request continues on another instance.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kvpilot import sse
from kvpilot.kvtransfer import protocol
from kvpilot.sim.sequence import Sequence
from kvpilot.sim.streams import MIGRATED, Stream, take_tokens
from kvpilot.sim.token_ids import WORD_BASE

WORDS = ("alpha", "beta", "gamma", "delta", "cache", "token", "route", "block", "prefix", "decode", "serve", "queue",
         "model", "layer", "batch", "scale", "pool", "node", "kernel", "tensor", "stream", "event", "score", "vector")

# What a finished prefill hands its decode instance (P/D), or None: awaited after the last token.
KVOut = Callable[[], Awaitable[dict[str, Any] | None]]


def text(stream: Stream, start: int, count: int) -> str:
    """Tokens `start`..`start+count` of a response, as text (deterministic per prompt)."""
    return "".join(" " + WORDS[(stream.seed + i) % len(WORDS)] for i in range(start, start + count))


def token_ids(stream: Stream, start: int, count: int) -> list[int]:
    return [WORD_BASE + (stream.seed + i) % len(WORDS) for i in range(start, start + count)]


def usage(seq: Sequence) -> dict[str, Any]:
    return {"prompt_tokens": seq.prompt_tokens, "completion_tokens": seq.output,
            "total_tokens": seq.prompt_tokens + seq.output,
            "prompt_tokens_details": {"cached_tokens": seq.cached_tokens}}


async def collect(stream: Stream, model: str, kv_out: KVOut) -> web.Response:
    """The whole response as one JSON body, once the last token is in."""
    while await stream.queue.get() is not None:
        pass
    seq, chat = stream.seq, stream.chat
    body = text(stream, 0, seq.output)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": body}
    else:
        choice["text"] = body
    if stream.prompt_ids is not None:
        choice.update(prompt_token_ids=stream.prompt_ids, token_ids=token_ids(stream, 0, seq.output))
    out: dict[str, Any] = {"id": seq.request_id, "object": "chat.completion" if chat else "text_completion",
                           "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(seq)}
    kv_params = await kv_out()
    if kv_params is not None:
        out["kv_transfer_params"] = kv_params
    return web.json_response(out)


async def stream_sse(request: web.Request, stream: Stream, model: str, kv_out: KVOut) -> web.StreamResponse:
    """SSE from `stream.sent` on (0 for a new request, the migration point for a migrated one)."""
    seq, chat = stream.seq, stream.chat
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = stream.created
    include_usage = stream.include_usage
    sent = stream.sent

    def chunk(choice: dict[str, Any], **extra: Any) -> bytes:
        payload = {"id": seq.request_id, "object": obj, "created": created, "model": model,
                   "choices": [choice], **extra}
        return sse.event(payload)

    # Like vLLM, the role chunk goes out with the first token, so the first body byte marks TTFT.
    role_pending = chat and sent == 0
    done = moved = False
    while not done and not moved:
        count, item = await take_tokens(stream)
        done, moved = item is None, item == MIGRATED
        if role_pending:
            await resp.write(chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}))
            role_pending = False
        if count:
            words = text(stream, sent, count)
            sent += count
            finish = "length" if done else None
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["delta"] = {"content": words}
            else:
                choice["text"] = words
            if stream.prompt_ids is not None:  # like vLLM: the prompt's ids ride on the first chunk
                choice.update({"prompt_token_ids": stream.prompt_ids} if sent == count else {},
                              token_ids=token_ids(stream, sent - count, count))
            await resp.write(chunk(choice))
            stream.sent = sent
    if moved:  # the request continues on another instance: tell the router where, and stop here
        assert stream.handoff is not None   # set with MIGRATED
        await resp.write(protocol.migrated_event(stream.handoff.model_copy(update={"tokens_sent": sent})))
        await resp.write_eof()
        return resp
    extra: dict[str, Any] = {}
    kv_params = await kv_out()
    if kv_params is not None:
        extra["kv_transfer_params"] = kv_params
    if include_usage or extra:
        payload = {"id": seq.request_id, "object": obj, "created": created, "model": model,
                   "choices": [], **({"usage": usage(seq)} if include_usage else {}), **extra}
        await resp.write(sse.event(payload))
    await resp.write(sse.DONE)
    await resp.write_eof()
    return resp
