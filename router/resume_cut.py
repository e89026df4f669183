"""When a move by resume cuts the source's stream: just past a KV block boundary (pure).

The target of a resume gets prompt + generated ids as a new prompt of `n` tokens. vLLM caches
and loads only *full* blocks, and never a request's last token, so the target takes
`(n - 1) // block_size` blocks from its cache or the shared store and computes the rest: the
tail, between 1 and `block_size` tokens. On a CPU engine (128-token blocks) a tail of a hundred
tokens attending to a 2k context is a prefill several times as long as a one-token step, and it
sits on the blocking path (cut → the target's first token). The source keeps decoding until the
cut, so waiting a few tokens for `n` to pass the next boundary costs the client nothing and
shrinks the tail to `1 + slack`. The slack is the number of extra source steps in which the
source's save of the block it just filled (a background write, `kvtransfer/vllm_connector.py`)
can land in the store before the target looks; the target also waits for it, briefly
(`load_params`), so a late write costs a short wait instead of a whole block of prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpilot.kvtransfer.protocol import RESUME_BLOCKS, RESUME_WAIT_S


@dataclass(frozen=True, slots=True)
class CutAlign:
    """How one move aligns its cut: the engines' block size and the bounds from the config."""

    block_size: int
    slack: int = 1          # tokens past the boundary the cut aims at
    max_wait: int = 128     # at most this many tokens relayed before the cut; past it, cut at once
    load_wait_s: float = 0.05   # how long the target waits for the source's last blocks to land
    pre_copy: bool = False      # warm the target with the blocks saved so far while the cut waits


def loadable_blocks(n: int, block_size: int) -> int:
    """Full blocks of an `n`-token prompt the engine may take from outside (never the last token)."""
    return max(0, (n - 1) // block_size)


def tail_tokens(n: int, block_size: int) -> int:
    """Tokens a target computes for an `n`-token resumed prompt when every loadable block is there."""
    return n - loadable_blocks(n, block_size) * block_size


def tokens_to_wait(n: int, align: CutAlign, left: int | None) -> int:
    """How many more tokens to relay before cutting a stream now at `n` tokens (prompt +
    generated); 0: cut now. `left`: tokens the request may still generate (None: unbounded).

    Cut now when the tail is already within the slack, when the next aligned point is further
    than `max_wait`, or when the request would reach its limit first (the target needs at least
    one token left to generate). A request that ends early (EOS) ends the wait with it; the
    relay then reports the move as aborted, as for a request that finishes during any move."""
    bs = align.block_size
    if align.max_wait <= 0 or bs <= 1:
        return 0
    slack = min(align.slack, bs - 1)
    if tail_tokens(n, bs) <= 1 + slack:
        return 0
    wait = (1 + slack - n) % bs   # until n ≡ 1 + slack (mod block size)
    if wait > align.max_wait or (left is not None and wait >= left):
        return 0
    return wait


def load_params(n: int, align: CutAlign) -> dict[str, Any]:
    """The continuation's `kv_transfer_params`: how many leading blocks the source has saved or is
    saving, for the target's connector to wait for (at most `load_wait_s`) before it counts hits."""
    return {RESUME_BLOCKS: loadable_blocks(n, align.block_size), RESUME_WAIT_S: align.load_wait_s}


def pre_copy_body(model: str, ids: list[int], align: CutAlign) -> dict[str, Any] | None:
    """While an aligned cut waits, a 1-token completion that makes the target load the blocks the
    source has saved so far into its prefix cache (none computed but the one token after them), so
    the continuation loads only the blocks filled since. None: not a single full block yet."""
    full = loadable_blocks(len(ids), align.block_size)
    if full < 1:
        return None
    return {"model": model, "prompt": ids[:full * align.block_size + 1], "max_tokens": 1, "temperature": 0,
            "stream": False, "kv_transfer_params": {RESUME_BLOCKS: full, RESUME_WAIT_S: align.load_wait_s}}
