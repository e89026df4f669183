"""Rebalancing in the virtual-time cluster: live migration vs queued-only moves vs none.

The cluster calls `Rebalancer.on_step` after each engine step. Every `interval_s` of virtual
time the rebalancer builds the same signals the live router uses (predicted TPOT: the
instance's last step time, smoothed; backlog: waiting prompt tokens at the profile's prefill
rate) and asks the router's pure policy (`kvpilot.router.migration_policy`) for moves.

- `queued`: the request moved is a waiting one (no KV yet): it simply joins the target's queue,
  losing any prefix-cache hit it had at the source. What a router-side queue can do.
- `live`: the request moved is a running one. Its KV is pre-copied while it keeps decoding
  on the source (`kv_tokens × kv_bytes_per_token / link_bytes_per_s`, the link being the
  store's measured write+read rate); at the source's first step boundary after that, it
  stops and the target adopts it at the same position. The stop-and-copy window itself
  (~10 ms measured by bench/kv_migration.py, under one decode step) is not modelled.
  Waiting requests are moved too, as in `queued`.

The cluster does the bookkeeping a move needs (which instance the request counts on) through
the `moved` callback it passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvpilot.router.migration_policy import Candidate, InstanceSignal, Thresholds, plan_migrations
from kvpilot.sim.engine import Engine
from kvpilot.sim.sequence import Phase, StepPlan
from kvpilot.sim.sequence import Sequence as Seq

Mode = Literal["none", "queued", "live"]
Moved = Callable[[Seq, int, int, float], None]   # (request, source, target, now)


@dataclass(slots=True)
class RebalanceConfig:
    mode: Mode = "live"
    theta: float = 0.8
    slo_tpot_s: float = 0.1
    slo_ttft_s: float = 5.0
    interval_s: float = 0.5
    link_bytes_per_s: float = 230e6      # Redis on loopback: ~300 MB/s writes, ~1 GB/s reads in series
    min_remaining_tokens: int = 32
    max_moves: int = 2
    ewma: float = 0.3


@dataclass(slots=True)
class RebalanceStats:
    live_moves: int = 0
    queued_moves: int = 0
    dropped: int = 0                     # pre-copies whose request finished or was preempted first
    bytes_copied: int = 0
    precopy_s: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _PreCopy:
    seq: Seq
    source: int
    target: int
    ready: float


class Rebalancer:
    def __init__(self, cfg: RebalanceConfig, kv_bytes_per_token: int, prefill_token_s: float) -> None:
        self.cfg = cfg
        self.kv_bytes_per_token = kv_bytes_per_token
        self.prefill_token_s = prefill_token_s
        self.stats = RebalanceStats()
        self._tpot: dict[int, float] = {}
        self._next = 0.0
        self._pending: list[_PreCopy] = []
        self._th = Thresholds(cfg.theta, cfg.slo_tpot_s, cfg.slo_ttft_s, cfg.min_remaining_tokens)

    def on_step(self, i: int, t: float, plan: StepPlan, engines: Sequence[Engine], moved: Moved) -> None:
        """Engine `i` finished `plan` at `t` and is between steps: the one place its requests move."""
        if self.cfg.mode == "none":
            return
        step = plan.first_step_s
        old = self._tpot.get(i)
        self._tpot[i] = step if old is None else old + self.cfg.ewma * (step - old)
        self._finish_precopies(i, t, engines, moved)
        if t < self._next:
            return
        self._next = t + self.cfg.interval_s
        busy = {p.seq for p in self._pending}
        signals = [self._signal(k, e, busy) for k, e in enumerate(engines)]
        for move in plan_migrations(signals, self._th, self.cfg.max_moves):
            src, dst = int(move.source), int(move.target)
            seq = next(s for s in (*engines[src].running, *engines[src].waiting) if s.request_id == move.request_id)
            if seq.phase == Phase.WAITING:
                engines[src].waiting.remove(seq)
                engines[dst].waiting.append(seq)
                self.stats.queued_moves += 1
                moved(seq, src, dst, t)
            else:
                precopy = seq.computed * self.kv_bytes_per_token / self.cfg.link_bytes_per_s
                self._pending.append(_PreCopy(seq, src, dst, t + precopy))
                self.stats.precopy_s.append(precopy)

    def _signal(self, k: int, engine: Engine, busy: set[Seq]) -> InstanceSignal:
        backlog = sum(s.prompt_tokens for s in engine.waiting) * self.prefill_token_s
        if self.cfg.mode == "queued":
            cands = [Candidate(s.request_id, s.prompt_tokens, s.max_tokens) for s in engine.waiting
                     if not s.admitted]
        else:  # live: running requests first (the cheapest copy), waiting ones when none can move
            cands = [Candidate(s.request_id, s.computed, s.max_tokens - s.output) for s in engine.running
                     if s.decoding and s not in busy]
            if not any(c.remaining_tokens >= self.cfg.min_remaining_tokens for c in cands):
                cands = [Candidate(s.request_id, s.prompt_tokens, s.max_tokens) for s in engine.waiting
                         if not s.admitted]
        tpot = self._tpot.get(k) if engine.running else None
        return InstanceSignal(str(k), tpot, backlog, tuple(cands))

    def _finish_precopies(self, i: int, t: float, engines: Sequence[Engine], moved: Moved) -> None:
        due = [p for p in self._pending if p.source == i and p.ready <= t]
        for p in due:
            self._pending.remove(p)
            seq, src, dst = p.seq, engines[p.source], engines[p.target]
            if seq.phase != Phase.RUNNING or not seq.decoding or not dst.can_adopt(seq.computed):
                self.stats.dropped += 1
                continue
            src.pause(seq)
            src.abort(seq)                 # frees the source's blocks; the target now holds the KV
            dst.adopt(seq)
            self.stats.live_moves += 1
            self.stats.bytes_copied += seq.computed * self.kv_bytes_per_token
            moved(seq, p.source, p.target, t)
