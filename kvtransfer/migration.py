"""Live migration's copy schedule (Llumnix's scheme), as pure functions.

A running request keeps decoding while its KV is copied: round 0 copies every block computed
so far, each later round copies what changed since (the blocks the new tokens landed in), and
when a round leaves a small enough delta — or the round budget is spent, because the request
outpaces the copy — the request is stopped, the last delta copied, and the target takes over.
Only that last step blocks decoding, so its cost is a few blocks, not the whole context.

The unit of copy is a block of `block_tokens` tokens. A block that was partly filled when it was
copied is copied again once more tokens land in it; a full block is copied exactly once.
Keys name the migration and the block index, so a re-copied block overwrites its earlier value.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Step(Enum):
    COPY = "copy"          # another pre-copy round while the request decodes
    STOP = "stop"          # stop the request and copy the last delta


@dataclass(slots=True, frozen=True)
class CopyTuning:
    block_tokens: int = 16           # tokens per copied block (the engine's KV block size)
    stop_delta_tokens: int = 32      # stop once a round leaves at most this many uncopied tokens
    max_rounds: int = 6              # pre-copy rounds before stopping regardless (request outpaces the copy)

    def __post_init__(self) -> None:
        if self.block_tokens <= 0 or self.max_rounds <= 0 or self.stop_delta_tokens < 0:
            raise ValueError("block_tokens and max_rounds must be positive, stop_delta_tokens non-negative")


def blocks_to_copy(copied_tokens: int, kv_tokens: int, block_tokens: int) -> range:
    """Indices of the blocks to copy when `copied_tokens` are already at the target and the
    request now has KV for `kv_tokens`: from the first block not fully copied to the last
    block holding a token."""
    if kv_tokens <= copied_tokens:
        return range(0)
    return range(copied_tokens // block_tokens, -(-kv_tokens // block_tokens))


def block_bytes(index: int, kv_tokens: int, block_tokens: int, bytes_per_token: int) -> int:
    """Size of block `index` when the request has KV for `kv_tokens` (the last one may be partial)."""
    tokens = min(block_tokens, kv_tokens - index * block_tokens)
    return max(0, tokens) * bytes_per_token


def next_step(rounds_done: int, delta_tokens: int, tuning: CopyTuning) -> Step:
    """After `rounds_done` pre-copy rounds with `delta_tokens` still uncopied: go on or stop."""
    if delta_tokens <= tuning.stop_delta_tokens or rounds_done >= tuning.max_rounds:
        return Step.STOP
    return Step.COPY


def migration_block_key(migration_id: str, index: int) -> str:
    """Store key of one copied block (see `kvpilot.kvtransfer.store` for the full Redis key)."""
    return f"mig:{migration_id}:{index}"
