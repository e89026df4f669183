"""What kvpilot's vLLM KV connector stores, loads and saves: the pure half (no vLLM, no torch, no I/O).

The connector (`vllm_connector.py`) is a thin shell over this: vLLM asks the scheduler side how
many leading tokens of a new request the store holds, allocates blocks, and every step the shell
turns what was scheduled into per-request load and save lists that travel to the worker. All of
those decisions live here, so they are unit-tested without an engine.

Content address. vLLM hashes each *full* block of a request's token ids, chained through its
parent (`request.block_hashes[i]` covers tokens `[0, (i+1)·bs)` plus LoRA, multimodal and
`cache_salt` keys), so one hash names a whole prefix. The hash says nothing about the model, its
dtype or the KV layout, so the store namespace does (`namespace`): two models, two dtypes or two
tensor-parallel layouts never share a block. One store value holds one block of one TP rank with
every layer's bytes concatenated (`join_layers`): a block is present whole or not at all, and an
evicted block is simply a miss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvpilot.kvtransfer.protocol import WarmReport


def namespace(*, model: str, revision: str | None, dtype: str, cache_dtype: str, block_size: int,
              num_layers: int, num_kv_heads: int, head_size: int, tp_size: int, device: str) -> str:
    """The store namespace of one KV layout: readable head (model's last path part, dtype, block
    size) plus a digest of everything that changes the bytes of a block."""
    ident = "|".join(map(str, (model, revision or "", dtype, cache_dtype, block_size, num_layers, num_kv_heads,
                               head_size, tp_size, device)))
    short = model.rstrip("/").rsplit("/", 1)[-1][:40] or "model"
    return f"vllm:{short}:{dtype}:bs{block_size}:{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def block_key(block_hash: bytes, rank: int = 0) -> str:
    """The store key of one block of one TP rank (the store adds its namespace prefix)."""
    return f"{block_hash.hex()}:r{rank}"


def loadable_blocks(num_tokens: int, block_size: int, num_hashes: int) -> int:
    """How many leading blocks a request may take from outside: full blocks only, and never its
    last token (the engine must compute at least one token to sample from)."""
    return max(0, min((num_tokens - 1) // block_size, num_hashes))


def leading_hits(present: Sequence[bool]) -> int:
    """Blocks the engine can use: a prefix is loaded, so a hit after a miss is worthless."""
    n = 0
    for hit in present:
        if not hit:
            break
        n += 1
    return n


def rank_present(present: Sequence[bool], tp_size: int) -> list[bool]:
    """Per block, whether every TP rank's share is stored (`present` is rank-major per block:
    block 0 ranks 0..tp-1, block 1 ranks 0..tp-1, ...)."""
    return [all(present[i * tp_size:(i + 1) * tp_size]) for i in range(len(present) // tp_size)]


def join_layers(parts: Sequence[bytes]) -> bytes:
    """One block's value: its layers' bytes back to back (every layer has the same block size)."""
    sizes = {len(p) for p in parts}
    if len(sizes) > 1:
        raise ValueError(f"layers of one block differ in size: {sorted(sizes)}")
    return b"".join(parts)


def split_layers(value: bytes, num_layers: int) -> list[bytes]:
    """The inverse of `join_layers`; a value of the wrong size is a corrupt block (ValueError)."""
    if num_layers <= 0 or len(value) % num_layers:
        raise ValueError(f"a block of {len(value)} bytes does not split into {num_layers} layers")
    size = len(value) // num_layers
    return [value[i * size:(i + 1) * size] for i in range(num_layers)]


@dataclass(slots=True)
class ReqOps:
    """One request's work in one step, sent to the workers: load these (block id, hash) pairs
    into the KV cache before the forward pass; save these after it."""

    req_id: str
    load: list[tuple[int, bytes]] = field(default_factory=list)
    save: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class _Tracked:
    saved_upto: int                     # blocks [0, saved_upto) are in the store or already queued
    load: list[tuple[int, bytes]] = field(default_factory=list)
    local_tokens: int = 0
    external_tokens: int = 0
    expected_blocks: int = 0            # P/D: blocks the prefill side said it saved
    first_ask: float | None = None


class BlockPlanner:
    """The scheduler side's bookkeeping, per request: what it matched, what to load, what to save.

    Calls mirror vLLM's: `matched` (get_num_new_matched_tokens; may repeat for one request),
    `allocated` (update_state_after_alloc), `step` (build_connector_meta) and `finished`
    (request_finished). `save` says whether this engine writes its blocks (not a pure consumer)."""

    def __init__(self, block_size: int, *, save: bool = True, pd_wait_s: float = 2.0) -> None:
        self.block_size = block_size
        self.save = save
        self.pd_wait_s = pd_wait_s
        self.reqs: dict[str, _Tracked] = {}
        self._pending_loads: dict[str, list[tuple[int, bytes]]] = {}

    def matched(self, req_id: str, num_tokens: int, hashes: Sequence[bytes], local_tokens: int,
                present: Sequence[bool], expected_blocks: int = 0, now: float = 0.0,
                wait_s: float | None = None) -> int | None:
        """External tokens to load for a new request, given which of its loadable blocks the
        store holds (`present`, one per block from block 0). `expected_blocks` > 0 (P/D: the
        prefill side's params; a resume: the blocks the source saved) waits (None: ask again next
        step) until that many leading blocks are there or `wait_s` (default `pd_wait_s`) passed
        since the first ask (`now`, seconds on any monotonic clock), since the other side's
        writes may still be in flight."""
        limit = loadable_blocks(num_tokens, self.block_size, len(hashes))
        hits = leading_hits(present[:limit])
        local = local_tokens // self.block_size
        tr = self.reqs.setdefault(req_id, _Tracked(saved_upto=0))
        want = min(expected_blocks, limit)
        if tr.first_ask is None:
            tr.first_ask = now
        if hits < want and now - tr.first_ask < (self.pd_wait_s if wait_s is None else wait_s):
            return None
        tr.expected_blocks = want
        tr.local_tokens = local_tokens
        # Re-save nothing the store already holds; local hits the store lacks are saved again.
        tr.saved_upto = hits if self.save else limit
        return max(0, hits - local) * self.block_size

    def allocated(self, req_id: str, hashes: Sequence[bytes], block_ids: Sequence[int], external_tokens: int) -> None:
        """Record the load of blocks [local, local + external) into the ids just allocated."""
        tr = self.reqs.setdefault(req_id, _Tracked(saved_upto=0))
        tr.external_tokens = external_tokens
        if external_tokens <= 0:
            return
        first = tr.local_tokens // self.block_size
        n = external_tokens // self.block_size
        self._pending_loads[req_id] = [(block_ids[i], hashes[i]) for i in range(first, first + n)]

    def step(self, scheduled: Sequence[tuple[str, int, Sequence[int], Sequence[bytes]]]) -> list[ReqOps]:
        """This step's ops from (req id, tokens computed once the step runs, the request's block ids
        in token order, its block hashes so far): pending loads, and saves of every block that
        is full after the step and not yet saved."""
        out: list[ReqOps] = []
        for req_id, done_tokens, block_ids, hashes in scheduled:
            ops = ReqOps(req_id, load=self._pending_loads.pop(req_id, []))
            tr = self.reqs.get(req_id)
            if tr is not None and self.save:
                full = min(done_tokens // self.block_size, len(hashes), len(block_ids))
                if full > tr.saved_upto:
                    ops.save = [(block_ids[i], hashes[i]) for i in range(tr.saved_upto, full)]
                    tr.saved_upto = full
            if ops.load or ops.save:
                out.append(ops)
        return out

    def finished(self, req_id: str) -> _Tracked | None:
        self._pending_loads.pop(req_id, None)
        return self.reqs.pop(req_id, None)


def warm_answer(tracked: _Tracked | None, num_prompt_tokens: int, block_size: int, num_hashes: int) -> WarmReport:
    """A finished request's `WarmReport`: its local prefix-cache hit, the tokens it was scheduled
    to load from the store (vLLM's accounting: a block whose load then failed was recomputed and
    still counts), and how many it could have taken from outside at most."""
    loadable = loadable_blocks(num_prompt_tokens, block_size, num_hashes) * block_size
    local = tracked.local_tokens if tracked else 0
    loaded = tracked.external_tokens if tracked else 0
    return WarmReport(local_tokens=local, loaded_tokens=loaded, loadable_tokens=loadable)
