"""`kvpilot sim calibrate`: measure a real OpenAI-compatible engine and fit a simulator profile.

The simulator's step time is linear in the work of the step (`kvpilot.sim.profiles`), so two sweeps
pin it down:
- prefill: one request at a time, prompts of growing length, `max_tokens=2`, streamed; the time to
  the first token is `overhead + step_s + prefill_token_s·L + attn_pair_s·L²/2`;
- decode: B concurrent streams of short or long prompts; the inter-token time of a decode step is
  `step_s + decode_seq_s·B + decode_ctx_s·B·context`.
Least squares over each sweep gives the coefficients (negative ones are dropped and refitted, as
a step cannot get faster with more work).

The client's TTFT also holds the API server's per-request work (HTTP, tokenization, handing the
request to the engine core and the first token back). Where the engine exports vLLM's
`request_prefill_time_seconds` (scheduled → first token, inside the engine core), each prefill
request is bracketed by two scrapes, so its engine time is known: the prefill coefficients are
fitted on that, and what the step model leaves of the client's TTFT is front-end time, fitted as
`request_overhead_s + frontend_token_s·L`. Without the metric the whole prefill intercept beyond a
decode step is `request_overhead_s`.

A CPU engine (vLLM's oneDNN GEMMs) builds kernels per batched token count and keeps a bounded
cache of them, so a step of a token count it has not run lately is slower (a 400-token prefill of
the tiny CPU model: 2-5 ms more than its 10 ms; bench/results/sim_fidelity.md). The sweeps therefore
repeat exact token counts (each request of a setting is the same words shuffled: same count, no
prefix hit), and a separate step measures the extra cost: pairs of prefills, one of a token count
this calibration has not sent, then the same count again; the differences, fitted as
`new_shape_s + new_shape_token_s × tokens`, give the cost (0 on an engine without the effect, e.g.
a GPU with CUDA graphs or the simulator). On the tiny CPU model it is a median 2-4 ms up to 700
tokens and 7-16 ms at 850, with a long tail (bench/cpu_new_shape.py).

Where the API server shares the engine's core (`--frontend-shares-core`), a request that arrives
while another decodes takes longer than the step it joins accounts for: the two processes wait on
each other's time slices. Busy rounds send the prefill sweep's prompts while a long stream decodes;
what their TTFT holds beyond the idle TTFT of the same count, half a decode step (arriving mid-step)
and the decode sharing their step is `busy_frontend_s` (median).

Stability on a shared machine: warm-up requests are discarded (they also build each setting's
kernels), the settings are measured in interleaved rounds (a slow minute then hits every setting
alike instead of skewing one), and each point is the median of its repeats.

No request hits the prefix cache (each is a fresh shuffle of its words). The same command makes a
profile for a GPU: point it at a vLLM serving the model on that GPU.

This module measures; the fits (pure functions from points to a `Profile`) are in
`kvpilot.sim.calibrate_fit`.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
import urllib.request
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.sim.calibrate_fit import BusyPoint, DecodePoint, PrefillPoint, ShapePoint
from kvpilot.sim.profiles import Profile

_WORDS = ("alpha", "beta", "gamma", "delta", "cache", "block", "token", "route", "serve", "model", "queue",
          "layer", "batch", "vector", "kernel", "tensor", "memory", "stream", "event", "scale", "node", "pool")


# -- measuring a live engine (the fits: kvpilot.sim.calibrate_fit) -------------------------------

def make_text(rng: random.Random, chars: int) -> str:
    words = [f"n{rng.getrandbits(48):x}"]  # a nonce first: every block hash differs, no prefix hits
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


class Prompts:
    """Prompts of repeatable token counts: one word list per setting, each prompt a fresh shuffle
    of it after a fixed first word. The tokenizer splits at spaces before merging (byte-level BPE),
    so a shuffle has the same token count, and no two prompts share a first block (no prefix hit)."""

    def __init__(self, rng: random.Random, chars_per_token: float) -> None:
        self.rng = rng
        self.chars_per_token = chars_per_token
        self.words: dict[tuple[int, int], list[str]] = {}

    def text(self, tokens: int, variant: int = 0) -> str:
        """A prompt of about `tokens` tokens, the same count every time for the same (tokens,
        variant); another variant draws other words, so likely another count."""
        if (tokens, variant) not in self.words:
            body: list[str] = []
            while sum(len(w) + 1 for w in body) < tokens * self.chars_per_token:
                body.append(self.rng.choice(_WORDS))
            self.words[tokens, variant] = body
        body = self.words[tokens, variant]
        return " ".join(["begin", *self.rng.sample(body, len(body))])


@dataclass(slots=True)
class Timed:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    chunk_times: list[float]
    start: float


async def stream_completion(session: aiohttp.ClientSession, base_url: str, model: str, prompt: str,
                            max_tokens: int) -> Timed:
    """One streamed completion; chunk arrival times relative to the request's start."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    start = time.perf_counter()
    times: list[float] = []
    usage: dict[str, Any] = {}
    async with session.post(base_url.rstrip("/") + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        buf = b""
        async for data in resp.content.iter_any():
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                line = event.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                payload = json.loads(line[5:])
                if payload.get("choices") and payload["choices"][0].get("text") is not None:
                    times.append(time.perf_counter() - start)
                if payload.get("usage"):
                    usage = payload["usage"]
    if not times:
        raise RuntimeError("the engine streamed no tokens")
    return Timed(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", len(times))), times[0],
                 times, start)


def itl(t: Timed) -> float | None:
    """Mean time between tokens after the first (the decode steps)."""
    if len(t.chunk_times) < 3:
        return None
    return (t.chunk_times[-1] - t.chunk_times[0]) / (len(t.chunk_times) - 1)


@dataclass(slots=True)
class Measured:
    prefill: list[PrefillPoint]
    decode: list[DecodePoint]
    shapes: list[ShapePoint]
    counts: list[int]           # the prompt token counts sent, in order (the kernels they built)
    busy: list[BusyPoint] = field(default_factory=list)

    @classmethod
    def pooled(cls, runs: Sequence[Measured]) -> Measured:
        """Every point of several calibrations, as one (to fit one profile through them all)."""
        return cls([p for m in runs for p in m.prefill], [p for m in runs for p in m.decode],
                   [p for m in runs for p in m.shapes], [n for m in runs for n in m.counts],
                   [p for m in runs for p in m.busy])

    def document(self, profile: Profile) -> dict[str, Any]:
        """The profile with the points it was fitted on: what a calibration writes (the simulator
        loads the file as a profile)."""
        return {"profile": profile.model_dump(), "points": {
            "prefill": [[p.prompt_tokens, p.ttft_s, p.engine_s] for p in self.prefill],
            "decode": [[p.batch, p.context, p.itl_s] for p in self.decode],
            "shapes": [[p.prompt_tokens, p.first_s, p.again_s] for p in self.shapes],
            "busy": [[p.prompt_tokens, p.ttft_s, p.context] for p in self.busy]}}


async def measure(base_url: str, model: str, *, prompt_lengths: Sequence[int], batches: Sequence[int],
                  decode_prompts: Sequence[int], decode_tokens: int, repeats: int, seed: int = 0,
                  warmup: int = 6, shape_pairs: int = 24, ran: Collection[int] = (),
                  busy_rounds: int = 0) -> Measured:
    """`ran`: token counts the caller knows the engine has run lately (their kernels are built, so
    the new-count pairs avoid them). `busy_rounds`: rounds of the prefill sweep's prompts sent
    while another request decodes (`Profile.busy_frontend_s`; 0: skip)."""
    rng = random.Random(seed)
    counts: list[int] = []
    # Idle pooled connections are dropped before the server's keep-alive timeout (uvicorn: 5 s) can
    # close them under a new request.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(keepalive_timeout=2)) as session:
        # Characters per token of this tokenizer on this text, from one probe request.
        probe = await stream_completion(session, base_url, model, make_text(rng, 2000), 2)
        prompts = Prompts(rng, 2000 / max(1, probe.prompt_tokens))

        async def send(tokens: int, max_tokens: int, variant: int = 0) -> Timed:
            t = await stream_completion(session, base_url, model, prompts.text(tokens, variant), max_tokens)
            counts.append(t.prompt_tokens)
            return t

        # First requests pay one-off costs (allocations, lazy imports, each setting's kernels): discarded.
        for k in range(max(warmup, len(prompt_lengths))):
            await send(prompt_lengths[k % len(prompt_lengths)], 4)
        await asyncio.gather(*(send(64, 8) for _ in range(max(batches))))
        # Prefill: one request at a time, in interleaved rounds over the lengths; two scrapes bracket each.
        ttfts: dict[int, list[Timed]] = {n: [] for n in prompt_lengths}
        engine: dict[int, list[float]] = {n: [] for n in prompt_lengths}
        before = await prefill_time_total(session, base_url)
        for _ in range(repeats):
            for n in rng.sample(list(prompt_lengths), len(prompt_lengths)):
                ttfts[n].append(await send(n, 2))
                after = await prefill_time_total(session, base_url)
                if before is not None and after is not None and after[1] - before[1] == 1:
                    engine[n].append(after[0] - before[0])
                before = after
        prefill = [PrefillPoint(int(statistics.median(t.prompt_tokens for t in ttfts[n])),
                                statistics.median(t.ttft_s for t in ttfts[n]),
                                statistics.median(engine[n]) if len(engine[n]) == len(ttfts[n]) else None)
                   for n in prompt_lengths]
        shapes = await _shape_pairs(session, base_url, send, shape_pairs, min(prompt_lengths),
                                    max(prompt_lengths), rng, counts, ran)
        busy = [b for _ in range(busy_rounds) for b in await _busy_round(send, prompt_lengths, rng)]
        # Decode: B concurrent streams, settings interleaved the same way.
        settings = [(n, b) for n in decode_prompts for b in batches]
        itls: dict[tuple[int, int], list[float]] = {k: [] for k in settings}
        contexts: dict[tuple[int, int], list[float]] = {k: [] for k in settings}
        for _ in range(repeats):
            for n, b in rng.sample(settings, len(settings)):
                runs = await asyncio.gather(*(send(n, decode_tokens) for _ in range(b)))
                itls[n, b].append(statistics.median(x for x in map(itl, runs) if x is not None))
                contexts[n, b].append(statistics.mean(r.prompt_tokens for r in runs) + decode_tokens / 2)
        decode = [DecodePoint(b, statistics.mean(contexts[n, b]), statistics.median(itls[n, b])) for n, b in settings]
    return Measured(prefill, decode, shapes, counts, busy)


async def _busy_round(send: Callable[..., Awaitable[Timed]], prompt_lengths: Sequence[int],
                      rng: random.Random, background_prompt: int = 64) -> list[BusyPoint]:
    """Each of the prefill sweep's prompts (the same token counts) sent twice while one long
    stream decodes; the second of each is kept (the first builds the kernels of its count plus
    the decode's token), if it finished before the stream did."""
    tokens = 60 * len(prompt_lengths)   # ≈ 10 decode steps per probe sent
    background = asyncio.ensure_future(send(background_prompt, tokens))
    await asyncio.sleep(0.2)             # until it decodes
    probes = []
    for n in rng.sample(list(prompt_lengths), len(prompt_lengths)):
        await send(n, 2)
        probes.append(await send(n, 2))
    stream = await background
    first, end = stream.start + stream.ttft_s, stream.start + stream.chunk_times[-1]
    out = []
    for t in probes:
        if first < t.start and t.start + t.chunk_times[-1] < end:
            decoded = tokens * (t.start - first) / max(1e-9, end - first)   # the stream's context then
            out.append(BusyPoint(t.prompt_tokens, t.ttft_s, stream.prompt_tokens + decoded))
    return out


async def _shape_pairs(session: aiohttp.ClientSession, base_url: str, send: Callable[..., Awaitable[Timed]],
                       pairs: int, lo: int, hi: int, rng: random.Random, counts: list[int],
                       ran: Collection[int]) -> list[ShapePoint]:
    """`pairs` prefills of a token count neither this calibration nor (as far as `ran` says) anyone
    else has sent, each followed by the same count again; a pair whose first count was already
    sent is discarded (both would reuse its kernels) and another is tried, up to 3 × `pairs`."""
    out: list[ShapePoint] = []
    for k in range(3 * pairs):
        if len(out) >= pairs:
            break
        n = rng.randint(lo, hi)
        sent = set(counts) | set(ran)
        times: list[tuple[Timed, float | None]] = []
        for _ in range(2):
            before = await prefill_time_total(session, base_url)
            t = await send(n, 2, k + 1)
            after = await prefill_time_total(session, base_url)
            one = before is not None and after is not None and after[1] - before[1] == 1
            times.append((t, after[0] - before[0] if one and before is not None and after is not None else None))
        (first, first_engine), (again, again_engine) = times
        if first.prompt_tokens in sent or first.prompt_tokens != again.prompt_tokens:
            continue
        if first_engine is not None and again_engine is not None:
            out.append(ShapePoint(first.prompt_tokens, first_engine, again_engine))
        else:
            out.append(ShapePoint(first.prompt_tokens, first.ttft_s, again.ttft_s))
    return out


async def prefill_time_total(session: aiohttp.ClientSession, base_url: str) -> tuple[float, float] | None:
    """(sum, count) of vLLM's `request_prefill_time_seconds` histogram, or None if not exported."""
    async with session.get(base_url.rstrip("/") + "/metrics") as resp:
        text = await resp.text()
    total = count = None
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:request_prefill_time_seconds":
            for s in family.samples:
                if s.name.endswith("_sum"):
                    total = (total or 0.0) + s.value
                elif s.name.endswith("_count"):
                    count = (count or 0.0) + s.value
    return None if total is None or count is None else (total, count)


def engine_cache_info(base_url: str) -> dict[str, str]:
    """vLLM's `cache_config_info` labels (block_size, num_gpu_blocks, …) from /metrics."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:cache_config_info":
            for s in family.samples:
                return dict(s.labels)
    return {}


def kv_geometry(info: dict[str, str]) -> tuple[int, int]:
    """(block size, KV capacity in tokens) from `cache_config_info` labels (absent ones read "None")."""
    def num(key: str) -> int:
        value = info.get(key, "")
        return int(value) if value.isdigit() else 0

    block_size = num("block_size") or 16
    return block_size, max(1, (num("num_gpu_blocks_override") or num("num_gpu_blocks")) * block_size)
