"""Prompt → tokens and prompt → block hashes, shared by the simulator and the router.

The router must hash a prompt's leading blocks exactly as the engine's prefix cache does, or
"same prefix → same instance" would not mean "same prefix → cache hit". Real tokenizers are
slow and model-specific, so kvpilot uses a cheap deterministic stand-in: every 4 bytes of UTF-8
text are one token (close to BPE's ~4 characters per token for English). A block of
`block_size` tokens is then a fixed byte range, and its hash is one C-level XXH3 call seeded
with the parent block's hash (chained like vLLM's prefix-cache hashes), with no per-token Python
work. The router hashes every prompt before routing it, so the hash must be cheap: keyed BLAKE2b
took ≈ 4 µs per 256-token block (0.5 ms for a 32k-token prompt), XXH3 ≈ 0.5 µs with the loop
(bench/results/router_decision.md). These hashes only name blocks for kvpilot's own router and
simulator, never a security boundary, so a non-cryptographic 64-bit hash is enough.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Mapping, Sequence

from xxhash import xxh3_64_intdigest

BYTES_PER_TOKEN = 4
_MASK64 = (1 << 64) - 1
ROOT_HASH = 0x6B7670696C6F74  # "kvpilot": the parent of every first block


def token_count(text: str | bytes) -> int:
    """Number of tokens in `text` (ceil of bytes / 4)."""
    data = text.encode() if isinstance(text, str) else text
    return (len(data) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


def token_ids(text: str | bytes, vocab_size: int = 32000) -> list[int]:
    """Token ids, for APIs that expose them (KV events, /tokenize). Each 4-byte chunk maps to one id."""
    data = text.encode() if isinstance(text, str) else text
    pad = (-len(data)) % BYTES_PER_TOKEN
    data += b"\0" * pad
    return [int.from_bytes(data[i : i + BYTES_PER_TOKEN], "little") % vocab_size
            for i in range(0, len(data), BYTES_PER_TOKEN)]


def chain_hash(parent: int, payload: bytes | memoryview) -> int:
    """64-bit hash of one block given its parent block's hash."""
    return int(xxh3_64_intdigest(payload, parent & _MASK64))


def block_hashes(text: str | bytes, block_size: int, max_blocks: int | None = None) -> list[int]:
    """Chained hashes of the prompt's full blocks (a trailing partial block is not hashed, as in
    vLLM). `max_blocks` stops early: the router only needs the leading blocks."""
    data = memoryview(text.encode() if isinstance(text, str) else text)
    step = block_size * BYTES_PER_TOKEN
    n = len(data) // step
    if max_blocks is not None:
        n = min(n, max_blocks)
    # Local names and a stepped range: the loop is ~0.5 µs a block, most of it the xxhash call's
    # argument parsing, so the loop's own lookups are worth saving (-10% at 32k tokens).
    out: list[int] = []
    append, digest = out.append, xxh3_64_intdigest
    parent = ROOT_HASH
    for i in range(0, n * step, step):
        parent = digest(data[i : i + step], parent)
        append(parent)
    return out


def segment_block_hashes(segments: Sequence[int], segment_tokens: int, prompt_tokens: int,
                         block_size: int) -> list[int]:
    """Chained block hashes for a prompt described by segment ids instead of text (trace replay:
    each Mooncake `hash_id` is a 512-token segment). Equal segment prefixes give equal hash
    prefixes. Uses Python's tuple hash, which is deterministic for ints, because virtual-time
    runs hash millions of blocks; the real-time path hashes text with `block_hashes` instead.
    One of `block_size` and `segment_tokens` must divide the other."""
    n = prompt_tokens // block_size
    out: list[int] = []
    h = ROOT_HASH
    if block_size <= segment_tokens:
        if segment_tokens % block_size:
            raise ValueError(f"block size {block_size} does not divide segment size {segment_tokens}")
        per = segment_tokens // block_size
        for j in range(min(n, len(segments) * per)):
            h = hash((h, segments[j // per], j % per))
            out.append(h)
    else:
        if block_size % segment_tokens:
            raise ValueError(f"segment size {segment_tokens} does not divide block size {block_size}")
        per = block_size // segment_tokens
        for j in range(min(n, len(segments) // per)):
            h = hash((h, *segments[j * per : (j + 1) * per]))
            out.append(h)
    return out


def segments_text(segments: Sequence[int], segment_tokens: int, prompt_tokens: int) -> str:
    """The prompt text for a segment-described prompt, exactly `prompt_tokens` tokens long."""
    text = "".join(block_text(s, segment_tokens) for s in segments)
    return text[: prompt_tokens * BYTES_PER_TOKEN]


_WORDS = ("the", "of", "and", "to", "in", "model", "cache", "token", "block", "serve", "route", "queue",
          "prefix", "decode", "prefill", "batch", "latency", "request", "replica", "cluster", "kernel",
          "memory", "tensor", "layer", "vector", "score", "event", "stream", "scale", "pool", "node", "gpu")


@functools.lru_cache(maxsize=8192)
def block_text(block_id: int, tokens: int = 512) -> str:
    """A deterministic ASCII text of exactly `tokens` tokens for a trace block id: equal ids give
    equal text, so shared ids become shared prompt prefixes at the router and in the engine."""
    rng = random.Random(block_id)
    size = tokens * BYTES_PER_TOKEN
    parts: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:size].ljust(size)


def render_chat(messages: Iterable[Mapping[str, object]]) -> str:
    """The prompt text of a chat request: a fixed, simple template. The router and the simulator
    both render chat requests with it, so chat prefixes hash the same on both sides."""
    parts = []
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        parts.append(f"<|{message.get('role', 'user')}|>\n{content}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)
