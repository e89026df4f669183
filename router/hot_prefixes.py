"""Which prefixes are hot, as the router sees them, and where their KV should go on a scale event.

The engines know their cached blocks; only the router knows which prefixes its traffic keeps
coming back to and which ring key each one maps to. `HotPrefixes` keeps a sliding window over
the affinity keys of the last `window` requests and, per key still in the window, the latest
prompt's head. The prefix worth moving is what the last two requests of a key shared (at least
the blocks that make up the key: every request with that key shares them), so a hot document
moves whole and a shared system prompt moves without the users' tails.

Planning is pure: `plan_scale_in` / `plan_scale_out` list, per pod, the hot prefixes it newly
owns when a pod leaves or joins (owners come from a function, e.g. `hashring.dual_ring_owners`);
`moves_in` / `moves_out` wrap them for the router's `Hot` view and, for a joining pod, pick as
source the current owner the router believes holds most of the prefix (not just the first ring
owner, which may never have served it). No I/O here:
`kvpilot.router.handover` does the HTTP.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvpilot.kvtransfer.scaling import HotPrefix
from kvpilot.tokens import BYTES_PER_TOKEN

Owners = Callable[[int, frozenset[str]], tuple[str, ...]]   # (affinity key, members) → the key's owners


@dataclass(slots=True)
class Hot:
    key: int                  # the ring key the policy routes the prefix by
    hits: int                 # requests in the window with this key
    hashes: tuple[int, ...]   # the router's block hashes of the prefix to move
    text: str                 # the prefix's text: the engine hashes it at its own block size
    chat: bool = False        # seen as a chat: `text` is kvpilot's rendering, not the engine's template

    def plan_view(self) -> HotPrefix:
        return HotPrefix(self.key, (), self.hits)


@dataclass(slots=True)
class _Sample:
    hashes: tuple[int, ...]
    text: str
    common: int               # leading router blocks shared by the last two requests
    chat: bool = False
    # Leading blocks of `text` that are the prefix `hashes` name: the text may come from an earlier
    # request of the key, kept while it still spells every block `hot` would move.
    text_blocks: int = 0


def common_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the shared head of two chained-hash lists (equal hash at i ⇒ equal prefix)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:   # the usual answer for a repeated prefix, compared in C
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def text_head(text: str, tokens: int) -> str:
    """The first `tokens` tokens of `text` (4 UTF-8 bytes each); a character cut in two is dropped."""
    return text.encode()[: tokens * BYTES_PER_TOKEN].decode(errors="ignore")


class HotPrefixes:
    def __init__(self, block_size: int, *, window: int = 1000, min_hits: int = 2, max_blocks: int = 32) -> None:
        self.block_size = block_size
        self.window = window
        self.min_hits = min_hits
        self.max_blocks = max_blocks
        self._recent: deque[int] = deque()
        self._counts: dict[int, int] = {}   # a plain dict: Counter's Python-level methods cost more than counting
        self._samples: dict[int, _Sample] = {}

    def observe(self, key: int, depth: int, hashes: list[int], prompt: str, chat: bool = False) -> None:
        """Count one request whose affinity key is `hashes[depth - 1]` (= `key`); `chat`: its
        prompt is a chat's messages as kvpilot renders them.

        It runs before every DualMap decision, so it copies prompt text only when `hot` could
        need it: once the key has `min_hits` requests, and only if the text kept from an earlier
        request of the key no longer spells the blocks to move (equal chained hashes mean equal
        bytes). Copying up to `max_blocks` blocks per request (32 kB at 32k tokens) was most of
        its cost, for keys that, under spread traffic, are never seen twice."""
        if depth <= 0 or depth > len(hashes):
            return  # keyed by something other than its prefix (a short prompt): nothing to move
        head = tuple(hashes[: self.max_blocks])
        counts = self._counts
        hits = counts.get(key, 0) + 1
        counts[key] = hits
        old = self._samples.get(key)
        common = depth if depth < len(head) else len(head)
        text, text_blocks = "", 0
        if old is not None:
            shared = common_blocks(old.hashes, head)
            if shared > common:
                common = shared
            text, text_blocks = old.text, min(old.text_blocks, shared)
        if text_blocks < common and hits >= self.min_hits:
            text, text_blocks = prompt[: len(head) * self.block_size * BYTES_PER_TOKEN], len(head)
        self._samples[key] = _Sample(head, text, common, chat, text_blocks)
        recent = self._recent
        recent.append(key)
        if len(recent) > self.window:
            gone = recent.popleft()
            left = counts[gone] - 1
            if left > 0:
                counts[gone] = left
            else:
                del counts[gone]
                self._samples.pop(gone, None)

    def hot(self, limit: int) -> list[Hot]:
        """The `limit` most requested keys with at least `min_hits` requests, hottest first."""
        out = []
        for key, hits in sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]:
            if hits < self.min_hits:
                break
            s = self._samples[key]
            out.append(Hot(key, hits, s.hashes[: s.common], text_head(s.text, s.common * self.block_size), s.chat))
        return out


def plan_scale_in(hot: Iterable[HotPrefix], leaving: str, members: frozenset[str],
                  owners: Owners, after: frozenset[str] | None = None) -> dict[str, list[HotPrefix]]:
    """Per remaining pod, the hot prefixes the leaving pod owns now that fall to that pod once
    it is gone (pods that already owned a prefix have its KV and get nothing), most used first.
    `after`: the members once the change is done, when pods join in the same change (a pod
    replaced by another); default `members` less the leaving pod."""
    after = members - {leaving} if after is None else after
    out: dict[str, list[HotPrefix]] = {}
    for p in sorted(hot, key=lambda p: (-p.hits, p.key)):
        before = owners(p.key, members)
        if leaving not in before:
            continue
        for pod in owners(p.key, after):
            if pod not in before:
                out.setdefault(pod, []).append(p)
    return out


def plan_scale_out(hot: Iterable[HotPrefix], joining: str, members: frozenset[str],
                   owners: Owners) -> dict[str, list[HotPrefix]]:
    """Per current owner, the hot prefixes the joining pod will newly own, to export for it."""
    after = members | {joining}
    out: dict[str, list[HotPrefix]] = {}
    for p in sorted(hot, key=lambda p: (-p.hits, p.key)):
        if joining in owners(p.key, after) and joining not in owners(p.key, members):
            source = next(iter(owners(p.key, members)), None)
            if source is not None:
                out.setdefault(source, []).append(p)
    return out


def moves_in(hot: list[Hot], leaving: str, members: frozenset[str], owners: Owners,
             after: frozenset[str] | None = None,
             held: Callable[[str, Hot], int] | None = None) -> dict[str, list[Hot]]:
    """Per remaining pod, the hot prefixes it inherits from `leaving` (which must be in `members`);
    `after` as in `plan_scale_in`. With `held` (blocks of a prefix the router believes a pod
    holds), a pod that was already one of the prefix's owners but does not hold all of it gets
    it too: a key's second candidate need not have served it (in a 2-pod pool, the one left
    is the second candidate of every key)."""
    by_key = {h.key: h for h in hot}
    plan = plan_scale_in([h.plan_view() for h in hot], leaving, members | {leaving}, owners, after)
    out = {pod: [by_key[p.key] for p in prefixes] for pod, prefixes in plan.items()}
    if held is None:
        return out
    members = members | {leaving}
    remaining = members - {leaving} if after is None else after
    for h in sorted(hot, key=lambda h: (-h.hits, h.key)):
        before = owners(h.key, members)
        if leaving not in before:
            continue
        for pod in owners(h.key, remaining):
            if pod in before and held(pod, h) < len(h.hashes):
                out.setdefault(pod, []).append(h)
    for moved in out.values():
        moved.sort(key=lambda h: (-h.hits, h.key))
    return out


def moves_out(hot: list[Hot], joining: str, members: frozenset[str], owners: Owners,
              held: Callable[[str, Hot], int]) -> dict[str, list[Hot]]:
    """Per current owner, the hot prefixes to export for `joining`: each from the owner that
    `held(owner, prefix)` (blocks believed cached) ranks highest, ring order breaking ties."""
    before = members - {joining}
    by_key = {h.key: h for h in hot}
    out: dict[str, list[Hot]] = {}
    for prefixes in plan_scale_out([h.plan_view() for h in hot], joining, before, owners).values():
        for p in prefixes:
            h = by_key[p.key]
            candidates = owners(p.key, before)
            source = max(candidates, key=lambda pod: (held(pod, h), -candidates.index(pod)))
            out.setdefault(source, []).append(h)
    for moved in out.values():
        moved.sort(key=lambda h: (-h.hits, h.key))
    return out


@dataclass(slots=True, frozen=True)
class Move:
    source: str               # the pod that exports the prefix
    target: str               # the pod that imports it
    prefix: Hot


def batches(moves: Sequence[Move], size: int) -> list[list[Move]]:
    """The moves in rounds of `size` prefixes, hottest first: a handover cut short by its time
    bound has then delivered the prefixes that matter most."""
    order = sorted({mv.prefix.key: mv.prefix for mv in moves}.values(), key=lambda h: (-h.hits, h.key))
    rounds = [{h.key for h in order[i : i + size]} for i in range(0, len(order), size)]
    return [[mv for mv in moves if mv.prefix.key in keys] for keys in rounds]


@dataclass(slots=True)
class Outcome:
    outcome: str              # ok | partial | failed | noop | unsupported
    prefixes: int = 0         # prefixes now in a target's cache
    bytes: int = 0            # KV bytes imported (export/import handovers)
    detail: str = ""
    tokens: int = 0           # KV tokens targets loaded from the shared store (pre-warmed vLLM pods)

    def body(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "prefixes": self.prefixes, "bytes": self.bytes, "tokens": self.tokens,
                "detail": self.detail}


def combine(parts: Sequence[Outcome]) -> Outcome:
    """One handover's outcome from its rounds': failed only when nothing arrived anywhere."""
    kinds = {p.outcome for p in parts}
    out = Outcome("noop", sum(p.prefixes for p in parts), sum(p.bytes for p in parts),
                  "; ".join(p.detail for p in parts if p.detail), sum(p.tokens for p in parts))
    if kinds & {"failed", "partial"}:
        out.outcome = "partial" if out.prefixes else "failed"
    elif "ok" in kinds:
        out.outcome = "ok"
    elif "unsupported" in kinds:
        out.outcome = "unsupported"
    return out
