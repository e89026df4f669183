"""Migration by *resume*, for engines that cannot hand a running request over (stock vLLM).

A stock vLLM instance has no way to export a request mid-decode, but it accepts a prompt given
as token ids and reports the ids it samples (`return_token_ids`). So the router keeps, for each
streaming completion of a model with `engine: vllm` and a `migration:` config, the prompt's ids
(first chunk) and every generated id it relayed. A move then:

1. cuts: source chunks from then on are held back, not forwarded. The cut is block-aligned
   (`kvpilot.router.resume_cut`): the target reuses only full KV blocks and computes the rest
   on the blocking path, so unless the engines' block size is unknown or the wait too long
   (`alignCutTokens`), the relay first lets the source stream on until prompt + generated is
   `cutSlackTokens` + 1 tokens past a block boundary; the target then computes that many tokens
   instead of up to a block (on CPU, up to 128 tokens attending to the whole context);
2. asks the target for a completion whose prompt is prompt ids + generated ids, with the same
   sampling parameters and `max_tokens` less what was generated (its prefix cache, or the
   shared store through kvpilot's connector, makes the re-prefill cheap; the continuation's
   `kv_transfer_params` let the connector wait briefly for the source's last block to land);
3. on the target's first token, closes the source connection (vLLM aborts the request), drops
   the held chunks and relays the target's stream instead, rewritten to look like the source's
   (same id; usage counted against the original prompt); the client sees one SSE stream with
   every token once, in order;
4. if the target fails, errs or times out before its first token, or the source finishes first,
   the held chunks are forwarded and the request goes on where it was: nothing was cancelled.

Whether the continuation is the one the source would have produced is the engine's business:
with greedy decoding and batch-invariant numerics it is; with sampling it is a valid
continuation, not the same one (kvtransfer/README.md, "Which guarantees hold in which mode").

Chat completions are not resumable (409): the continuation would have to go through the
completions API with the chat template's ids, and the chat-specific output processing (reasoning
and tool-call parsers, the role chunk) would not be the source's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kvpilot import sse
from kvpilot.router.pool import Member
from kvpilot.router.resume_cut import CutAlign, load_params, pre_copy_body, tail_tokens, tokens_to_wait

COMPLETIONS = "/v1/completions"


class ResumeFailed(Exception):
    """The target could not take the request over; it stays on the source."""


# -- the pure part: which requests, which bodies, which chunks --------------------------------
def upstream_body(body: dict[str, Any]) -> dict[str, Any]:
    """The source's request: the client's, asking for token ids (stripped again before relaying)."""
    if "messages" in body or not body.get("stream"):
        return body
    return {**body, "return_token_ids": True}


def refusal(body: dict[str, Any]) -> str | None:
    """Why a request cannot be resumed elsewhere, whatever its progress (None: it can)."""
    if "messages" in body:
        return "chat completions are not migratable by resume (the chat output processing is the engine's)"
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
        return "requests with n > 1 or best_of > 1 are not migratable by resume"
    if body.get("echo"):
        return "echo requests are not migratable by resume"
    if body.get("stop"):
        return "requests with stop strings are not migratable by resume (the source holds back partial matches)"
    return None


def continuation(body: dict[str, Any], prompt_ids: list[int], generated: list[int]) -> dict[str, Any]:
    """The target's request: the same one, its prompt extended by what was generated already."""
    out = {**body, "prompt": [*prompt_ids, *generated], "return_token_ids": True, "stream": True}
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            out[key] = body[key] - len(generated)
    if isinstance(body.get("min_tokens"), int):
        out["min_tokens"] = max(0, body["min_tokens"] - len(generated))
    return out


def split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """Whole SSE events (with their blank line) and the incomplete rest."""
    events = []
    while (end := buf.find(b"\n\n")) >= 0:
        events.append(buf[: end + 2])
        buf = buf[end + 2 :]
    return events, buf


@dataclass(slots=True, eq=False)
class Pending:
    """A move asked for by `POST /kvpilot/migrate`: the relay resolves `done` with the outcome.
    With `align` the relay cuts only once the stream is just past a KV block boundary."""

    target: Member
    done: asyncio.Future[dict[str, Any]]
    align: CutAlign | None = None
    cut_due: int | None = None     # prompt + generated tokens at which to cut (set by the relay)
    asked: int = 0                 # prompt + generated tokens when the relay took the move up
    asked_at: float = 0.0


@dataclass(slots=True, eq=False)
class ResumeState:
    """What the router knows of one stream: enough to re-issue it anywhere."""

    body: dict[str, Any]                  # the client's request
    stream_id: str | None = None          # the id of the client's chunks
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    offset: int = 0                       # generated ids the current upstream had in its prompt
    pending: Pending | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def tokens(self) -> int:
        """Prompt + generated ids so far: the length of a continuation's prompt if cut now."""
        return len(self.prompt_ids or ()) + len(self.generated)

    def left(self) -> int | None:
        """Tokens the request may still generate (None: no limit given)."""
        limit = self.body.get("max_tokens", self.body.get("max_completion_tokens"))
        return limit - len(self.generated) if isinstance(limit, int) else None

    def not_now(self) -> str | None:
        """Why this stream cannot be resumed at this moment (None: it can)."""
        if (why := refusal(self.body)) is not None:
            return why
        if self.prompt_ids is None:
            return "no token relayed yet: nothing to resume from"
        if self.finished:
            return "the request has finished"
        if (left := self.left()) is not None and left < 1:
            return "no tokens left to generate"
        return None

    def on_event(self, event: bytes) -> bytes:
        """Record an upstream event's ids; return it as the client should see it."""
        data = sse.payload(event)
        if data is None or not isinstance(data.get("choices"), list):
            return event
        keep = bool(self.body.get("return_token_ids"))
        if self.offset == 0 and self.stream_id is None:
            self.stream_id = data.get("id")
        changed = False
        if self.offset and data.get("id") != self.stream_id:
            data["id"] = self.stream_id
            changed = True
        usage = data.get("usage")
        if self.offset and isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            usage["prompt_tokens"] -= self.offset
            usage["completion_tokens"] = int(usage.get("completion_tokens") or 0) + self.offset
            changed = True
        for choice in data["choices"]:
            if not isinstance(choice, dict):
                continue
            # What vLLM sends when the ids are not asked for (or after the first chunk): null.
            if choice.get("prompt_token_ids") is not None:
                if self.offset == 0 and self.prompt_ids is None:
                    self.prompt_ids = list(choice["prompt_token_ids"])
                if self.offset or not keep:
                    choice["prompt_token_ids"] = None
                    changed = True
            if choice.get("token_ids") is not None:
                self.generated.extend(choice["token_ids"])
                if not keep:
                    choice["token_ids"] = None
                    changed = True
            if choice.get("finish_reason") is not None:
                self.finished = True
        if not changed:
            return event
        return sse.event(data)


# -- the shell: the relay that cuts, holds, switches -----------------------------------------
async def open_target(session: aiohttp.ClientSession, target: Member, body: dict[str, Any],
                      headers: dict[str, str] | None) -> tuple[aiohttp.ClientResponse, bytes]:
    """POST the continuation; return the response once its first event (a token) is in."""
    resp = await session.post(target.url + COMPLETIONS, json=body, headers=headers)
    try:
        if resp.status != 200:
            raise ResumeFailed(f"target answered HTTP {resp.status}: {(await resp.read())[:200]!r}")
        buf = b""
        while b"\n\n" not in buf:
            data = await resp.content.readany()
            if not data:
                raise ResumeFailed("target closed its stream before the first token")
            buf += data
        first = sse.payload(buf[: buf.find(b"\n\n") + 2])
        if first is None or not first.get("choices"):
            raise ResumeFailed(f"target's first event is not a token: {buf[:200]!r}")
        return resp, buf
    except BaseException:
        resp.close()
        raise


async def pre_copy(session: aiohttp.ClientSession, target: Member, body: dict[str, Any], timeout_s: float) -> None:
    """Warm the target while the cut waits; any failure only means the continuation loads more.
    Sent without the stream's request-id header: it is a request of its own on the target."""
    try:
        async with session.post(target.url + COMPLETIONS, json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        pass


async def relay(session: aiohttp.ClientSession, up: aiohttp.ClientResponse, st: ResumeState,
                headers: dict[str, str] | None, timeout_s: float,
                on_events: Callable[[int], None], on_moved: Callable[[Member], None]) -> AsyncIterator[bytes]:
    """The client's bytes: the source's, continued on a target each time a move succeeds."""
    source, rest = up, b""
    held: list[bytes] = []
    read: asyncio.Task[bytes] | None = None
    opening: asyncio.Task[tuple[aiohttp.ClientResponse, bytes]] | None = None
    waker: asyncio.Task[bool] | None = None
    warming: asyncio.Task[None] | None = None
    cut_at, cut, tail = 0.0, 0, None

    def resolve(result: dict[str, Any]) -> None:
        if st.pending is not None and not st.pending.done.done():
            st.pending.done.set_result(result)
        st.pending = None

    def due() -> bool:
        """Whether the pending move cuts now (it is taken up on first sight: where to cut)."""
        p = st.pending
        assert p is not None
        if p.cut_due is None:
            nonlocal warming
            wait = tokens_to_wait(st.tokens(), p.align, st.left()) if p.align is not None else 0
            p.asked, p.asked_at, p.cut_due = st.tokens(), time.monotonic(), st.tokens() + wait
            if wait and p.align is not None and p.align.pre_copy and (warming is None or warming.done()):
                warm = pre_copy_body(str(st.body.get("model")), [*(st.prompt_ids or ()), *st.generated], p.align)
                if warm is not None:
                    warming = asyncio.ensure_future(pre_copy(session, p.target, warm, timeout_s))
        # A stream slower than expected does not hold the move past half the resume timeout.
        return st.tokens() >= p.cut_due or time.monotonic() - p.asked_at > timeout_s / 2

    def start_cut() -> asyncio.Task[tuple[aiohttp.ClientResponse, bytes]]:
        nonlocal cut, cut_at, tail
        p = st.pending
        assert p is not None
        cut, cut_at = len(st.generated), time.monotonic()   # from here, source chunks are held
        body = continuation(st.body, st.prompt_ids or [], st.generated)
        tail = None
        if p.align is not None:
            body["kv_transfer_params"] = {**(body.get("kv_transfer_params") or {}), **load_params(st.tokens(), p.align)}
            tail = tail_tokens(st.tokens(), p.align.block_size)
        return asyncio.ensure_future(asyncio.wait_for(open_target(session, p.target, body, headers), timeout_s))

    try:
        while True:
            if read is None:
                read = asyncio.ensure_future(source.content.readany())
            if opening is None and st.pending is not None:
                if (why := st.not_now()) is not None:
                    resolve({"outcome": "rejected", "reason": why})
                    continue
                if due():
                    opening = start_cut()
            if waker is None:
                waker = asyncio.ensure_future(st.wake.wait())
            await asyncio.wait([t for t in (read, opening, waker) if t is not None],
                               return_when=asyncio.FIRST_COMPLETED)
            if waker.done():
                st.wake.clear()
                waker = None
            if opening is not None and opening.done():
                assert st.pending is not None
                target, task, opening = st.pending.target, opening, None
                try:
                    resp, first = task.result()
                except Exception as e:  # whatever went wrong on the target, R goes on on the source
                    resolve({"outcome": "aborted", "reason": f"target {target.endpoint.name}: {e or type(e).__name__}"})
                    if held:
                        on_events(len(held))
                        yield b"".join(held)
                    held = []
                    continue
                # Commit: the target has the request. Cancel it on the source, forget what it sent since the cut.
                read.cancel()
                read = None
                source.close()
                source, held = resp, []
                waited = len(st.prompt_ids or ()) + cut - st.pending.asked
                del st.generated[cut:]
                st.offset, st.finished = cut, False
                on_moved(target)
                resolve({"outcome": "migrated", "mode": "resume", "resumed_tokens": cut,
                         "blocking_ms": round((time.monotonic() - cut_at) * 1000, 3),
                         "cut_wait_tokens": waited, "target_tail_tokens": tail})
                events, rest = split_events(first)
                firsts = [st.on_event(e) for e in events]
                on_events(len(firsts))
                yield b"".join(firsts)
                continue
            if not read.done():
                continue
            data = read.result()
            read = None
            if not data:   # the upstream ended (finished, or failed: the proxy sees which)
                if opening is not None:
                    opening.cancel()
                    resolve({"outcome": "aborted", "reason": "the request finished before the target answered"})
                elif st.pending is not None:
                    resolve({"outcome": "aborted", "reason": "the request finished before the cut"})
                for event in held:
                    yield event
                if rest:
                    yield rest
                return
            events, rest = split_events(rest + data)
            out: list[bytes] = []
            for event in events:
                if opening is not None:
                    held.append(st.on_event(event))
                    continue
                out.append(st.on_event(event))
                # An aligned cut falls between two events: relay those before it, hold the rest.
                if st.pending is not None and st.not_now() is None and due():
                    on_events(len(out))
                    yield b"".join(out)
                    out = []
                    opening = start_cut()
            if out:
                on_events(len(out))
                yield b"".join(out)
    finally:
        for waiting in (read, waker, warming):
            if waiting is not None:
                waiting.cancel()
        if opening is not None:
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                opening.result()[0].close()
            opening.cancel()   # open_target closes its response when cancelled
        resolve({"outcome": "aborted", "reason": "the stream ended"})
        if source is not up:
            source.close()
