"""A request as the engine model sees it, a planned step, and the engine's counters: the plain
data the scheduler (`kvpilot.sim.engine`) works on and its drivers (the real-time server, the
virtual-time clusters) read back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum


class Phase(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    ABORTED = 3
    PAUSED = 4      # held out of scheduling with its blocks kept (live migration's stop-and-copy)


@dataclass(slots=True, eq=False)
class Sequence:
    """One request inside one engine."""

    request_id: str
    arrival: float
    prompt_tokens: int
    block_hashes: list[int]          # chained hashes of the prompt's full blocks
    max_tokens: int
    external_tokens: int = 0         # prompt tokens whose KV arrives from another instance (P/D decode)
    phase: Phase = Phase.WAITING
    computed: int = 0                # tokens whose KV is in the cache
    output: int = 0                  # tokens sampled so far
    cached_tokens: int = 0           # prefix-cache hit at first admission
    preemptions: int = 0
    blocks: list[int] = field(default_factory=list)
    num_hashed: int = 0              # leading prompt blocks registered in the prefix cache
    admitted: bool = False
    first_scheduled: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.output

    @property
    def decoding(self) -> bool:
        return self.output > 0 and self.computed == self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.phase == Phase.FINISHED or self.phase == Phase.ABORTED


@dataclass(slots=True)
class StepPlan:
    items: list[tuple[Sequence, int]]   # (sequence, tokens to compute in each step)
    steps: int                          # identical decode steps covered by this plan
    first_step_s: float                 # duration of the first step
    ctx_growth_s: float                 # extra duration of each later step (contexts grow)
    start: float = 0.0
    frontend: list[Sequence] = field(default_factory=list)  # front-end work done during this step

    def duration(self, steps: int | None = None) -> float:
        k = self.steps if steps is None else steps
        return k * self.first_step_s + self.ctx_growth_s * k * (k - 1) / 2

    def steps_done_by(self, elapsed: float) -> int:
        """Fewest steps (≥ 1) whose total duration reaches `elapsed`: the step in flight at
        `elapsed` completes before anything new can join."""
        a, b = self.first_step_s, self.ctx_growth_s
        if b <= 0:
            k = math.ceil(elapsed / a - 1e-12)
        else:
            k = math.ceil((-(a - b / 2) + math.sqrt((a - b / 2) ** 2 + 2 * b * elapsed)) / b - 1e-12)
        k = max(1, min(self.steps, k))
        while k > 1 and self.duration(k - 1) >= elapsed:
            k -= 1
        while k < self.steps and self.duration(k) < elapsed:
            k += 1
        return k


@dataclass(slots=True)
class EngineCounters:
    """Monotonic counters with vLLM's meanings (token counts, not request counts, for the cache)."""

    prompt_tokens: int = 0
    prompt_tokens_local_compute: int = 0
    prompt_tokens_local_cache_hit: int = 0
    prompt_tokens_external: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # A preempted request's lookups when it is scheduled again (it mostly hits its own freed
    # blocks): vLLM records them apart (PrefixCacheStats.preempted_queries/_hits) and does not
    # export them in vllm:prefix_cache_*, which would otherwise reward overload with "hits".
    preempted_cache_queries: int = 0
    preempted_cache_hits: int = 0
    generation_tokens: int = 0
    request_success: int = 0
    num_preemptions: int = 0
    steps: int = 0
