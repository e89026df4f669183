"""The simulator's token ids, so that it can stand in for vLLM where the router works on ids.

vLLM returns token ids (`return_token_ids`) and accepts a prompt given as ids; the router's
*resume* migration (`kvpilot.router.resume`) relies on both: it re-issues prompt + generated ids
to another instance, which must continue exactly where the first one was cut.

The simulator's tokenizer is kvpilot's 4-bytes-per-token stand-in made lossless: a prompt token
is its 4 bytes of UTF-8 read as an integer (< 2**32), so ids decode back to the very text, whose
block hashes (and so prefix-cache hits) are the text prompt's. A generated token is a word of
the simulator's output vocabulary, id `WORD_BASE + word index`. The simulated model is greedy:
the response to a text is a fixed word sequence, and a context that ends with k generated words
continues that sequence at position k — which is what a resumed request needs.
"""

from __future__ import annotations

from kvpilot.tokens import BYTES_PER_TOKEN

WORD_BASE = 1 << 32


def encode(text: str) -> list[int]:
    """A text prompt's ids: each 4 bytes of UTF-8 (the last one zero-padded) as one integer."""
    data = text.encode()
    data += b"\0" * ((-len(data)) % BYTES_PER_TOKEN)
    return [int.from_bytes(data[i : i + BYTES_PER_TOKEN], "little") for i in range(0, len(data), BYTES_PER_TOKEN)]


def decode_prompt(ids: list[int], words: tuple[str, ...]) -> tuple[str, int]:
    """(the text the generation continues from, how many generated words the context ends with).

    Words inside the context (not at its end) are read as their text."""
    k = 0
    while k < len(ids) and ids[len(ids) - 1 - k] >= WORD_BASE:
        k += 1
    parts: list[bytes] = []
    for t in ids[: len(ids) - k]:
        if t < 0 or t >= WORD_BASE + len(words):
            raise ValueError(f"token id {t} is out of the vocabulary")
        parts.append(words[t - WORD_BASE].encode() if t >= WORD_BASE else t.to_bytes(BYTES_PER_TOKEN, "little"))
    if any(t >= WORD_BASE + len(words) for t in ids[len(ids) - k :]):
        raise ValueError("token id out of the vocabulary")
    return b"".join(parts).rstrip(b"\0").decode(errors="replace"), k
