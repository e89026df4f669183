"""What a request pays in the router before it is dispatched, per policy and cluster size.

    .venv/bin/python -P bench/router_decision.py [--instances 8 128 1000] [--prompt-tokens 1024 32768]
        [--policies dualmap ...] [--requests N] [--cpu-clock] [--spread] [--hold] [--kv-events]

The live proxy's own parts run on real prompt text, built from the config as `kvpilot router`
builds them (`Runtime`): a router config with N endpoints, the model's pool and policy. Per
request, timed with perf_counter_ns (or the thread's CPU clock):
- parse: `json.loads` of the request body (aiohttp's `request.json()` does this);
- validate: the typed check of the decoded body (`kvpilot.router.openai_schema.validate`);
- hash: `ModelRuntime.request_view`, the prompt's token count and chained block hashes at the
  router's block size (256 tokens, at most 256 blocks, the config's defaults);
- observe: the scale-event handover's hot-prefix tracking (DualMap only);
- decide: `Pool.choose` (route + on_dispatch + the pool's load accounting), or with `--hold`
  `Pool.admit` through the router-side queue (DualMap's live default);
- total: hash + observe + decide, the pre-dispatch path without `kvEvents` (parse reported apart).
With `--kv-events` the model follows KV events: each request is also a chat, and the model's
chat-template rendering and tokenization (`KVEventIndex.chat_keys`) are timed on their own, with
a BPE tokenizer trained here with the `tokenizers` library (no model tokenizer can be fetched on
this machine) and a Llama-3-style template. They run in a worker thread for long prompts
(`runtime.OFFLOAD_CHARS`), so they are reported apart from the event loop's critical path.

Prompts are Mooncake-like: a shared 512-token head, a per-conversation prefix drawn Zipf-like from
5,000 (uniformly from 100,000 with `--spread`, so every decision lands on cold instance state),
then a unique tail. After every decision the attempt completes at once with a 0.1 s first token
(untimed), so backlogs stay empty as at light load. p50/p99 over `--requests` after `--warmup` (2,000) untimed ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvpilot.router.config import RouterConfig
from kvpilot.router.kv_events import KVEventIndex, load_chat_template
from kvpilot.router.openai_schema import validate
from kvpilot.router.pool import Attempt
from kvpilot.router.runtime import ModelRuntime, Runtime
from kvpilot.sim.cluster import percentile
from kvpilot.tokens import BYTES_PER_TOKEN, block_text

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def prompts(n: int, tokens: int, seed: int, spread: bool) -> Iterator[str]:
    """Prompt texts of `tokens` tokens: a shared head, a conversation prefix, a unique tail.
    Made one at a time, as requests arrive (a list of 20k long prompts would fill the CPU caches
    with the benchmark's own data)."""
    rng = random.Random(seed)
    size = tokens * BYTES_PER_TOKEN
    filler = "".join(block_text(10_000_000 + k, 512) for k in range(64))   # tail text, sliced per request
    half = len(filler) // 2
    filler += filler   # a tail starting anywhere in the first half wraps around without a copy per request
    head = block_text(0, 512)
    for i in range(n):
        convo = rng.randrange(100_000) if spread else int(rng.paretovariate(1.2)) % 5000
        prefix = head + block_text(1_000_000 + convo, 512) + f"request {i} "
        start = rng.randrange(half)
        # Only the prompt's own bytes are copied: building the whole wrapped tail first wrote
        # ~0.8 MB per request, which evicted the router's state from the L2 cache between the
        # decisions this benchmark times (a 1k-token request's body is 4 kB).
        yield (prefix + filler[start : start + max(0, size - len(prefix))])[:size]


def train_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (32k vocabulary) trained on the benchmark's own text, saved as a
    model directory (tokenizer.json + tokenizer_config.json with the chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32_000, special_tokens=["<|begin_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((block_text(k, 512) for k in range(2000)), trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE,
                                                                 "bos_token": "<|begin_of_text|>"}))


def runtime(policy: str, n: int, hold: bool, tokenizer_dir: Path | None) -> Runtime:
    model: dict[str, Any] = {
        "name": "m", "policy": policy, "holdRequests": hold, "ttftMs": 5000, "kvCapacityTokens": 445_000,
        "endpoints": [{"name": f"pod-{i}", "url": f"http://127.0.0.1:{10_000 + i}"} for i in range(n)]}
    if tokenizer_dir is not None:
        model["kvEvents"] = {"bind": "tcp://127.0.0.1:0", "tokenizer": str(tokenizer_dir)}
    return Runtime(RouterConfig.model_validate({"models": [model]}))


def run(rt: Runtime, tokens: int, args: argparse.Namespace, clock: Callable[[], int]) -> dict[str, list[float]]:
    return asyncio.run(_run(rt, tokens, args, clock))


async def _run(rt: Runtime, tokens: int, args: argparse.Namespace, clock: Callable[[], int]) -> dict[str, list[float]]:
    """Inside a running event loop, as the proxy runs: `admit` costs no loop round trip when the
    request is released at once."""
    model: ModelRuntime = rt.models["m"]
    handovers = rt.handovers
    pool = model.main
    times: dict[str, list[float]] = {k: [] for k in ("parse", "validate", "hash", "observe", "decide", "total",
                                                     "template")}
    index: KVEventIndex | None = model.kv_index
    for k, prompt in enumerate(prompts(args.requests + args.warmup, tokens, seed=len(pool.members),
                                       spread=args.spread)):
        rid = f"r{k}"
        messages = [{"role": "user", "content": prompt}]
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 16}).encode()
        t0 = clock()
        decoded = json.loads(body)
        tv = clock()
        validate(decoded, False)
        t1 = clock()
        view = model.request_view(rid, prompt)
        t2 = clock()
        handovers.observe("m", view, prompt)
        t3 = clock()
        if args.hold:
            chosen = await pool.admit(view)
            assert chosen is not None, "the queue holds a request with every instance idle"
            member = chosen[0]
        else:
            picked = pool.choose(view)
            assert picked is not None
            member = picked[0]
        t4 = clock()
        if index is not None:
            index.chat_keys(messages)
        t5 = clock()
        attempt = Attempt(pool, member, view)   # the upstream answers at once (untimed)
        attempt.first_token(0.1)
        attempt.status = "ok"
        attempt.end()
        if k >= args.warmup:
            for key, dt in (("parse", tv - t0), ("validate", t1 - tv), ("hash", t2 - t1), ("observe", t3 - t2),
                            ("decide", t4 - t3), ("total", t4 - t1), ("template", t5 - t4)):
                times[key].append(dt / 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, nargs="+", default=[8, 128, 1000])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 32768])
    parser.add_argument("--policies", nargs="+", default=["dualmap", "round-robin", "consistent-hash",
                                                          "cache-aware", "min-ttft"])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2000, help="untimed requests first")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time with the thread's CPU clock: on a shared, overloaded machine it leaves out "
                             "the time this process was not running, which otherwise owns the p99")
    parser.add_argument("--spread", action="store_true",
                        help="uniform conversations instead of Zipf-like ones: every decision lands on cold state")
    parser.add_argument("--hold", action="store_true",
                        help="decide through the router-side queue (Pool.admit), DualMap's live default")
    parser.add_argument("--kv-events", action="store_true",
                        help="the model follows KV events: time chat-template rendering + tokenization too")
    args = parser.parse_args()
    clock = time.thread_time_ns if args.cpu_clock else time.perf_counter_ns
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = None
        if args.kv_events:
            tokenizer_dir = Path(tmp)
            train_tokenizer(tokenizer_dir)
            assert load_chat_template(str(tokenizer_dir)) is not None
        cols = ["parse", "validate", "hash", "observe", "decide", "total"] + (["template"] if args.kv_events else [])
        print("| policy | instances | prompt tokens | " + " | ".join(f"{c} p50 µs | {c} p99 µs" for c in cols) + " |")
        print("|---|---:|---:|" + "---:|---:|" * len(cols))
        for policy in args.policies:
            for n in args.instances:
                for tokens in args.prompt_tokens:
                    times = run(runtime(policy, n, args.hold, tokenizer_dir), tokens, args, clock)
                    cells = " | ".join(f"{percentile(times[c], 50):.1f} | {percentile(times[c], 99):.1f}" for c in cols)
                    print(f"| {policy} | {n} | {tokens} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
