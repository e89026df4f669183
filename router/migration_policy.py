"""When to live-migrate a running request, and which one where: a pure policy.

An instance is a hot spot when its predicted time per output token (the inter-token gaps of
its streams, smoothed) or its backlog (prompt tokens dispatched and not yet prefilled, at the
prefill rate) goes over θ × the SLO. From each hot spot one running request moves to the
coolest instance that is under θ/2 of both SLOs, so a move does not create the next hot spot.
The request chosen is the one with the least KV among those with enough tokens left to be
worth moving (Llumnix's choice: the cheapest copy, the shortest stop).

The live router (`kvpilot.router.migration`) and the virtual-time cluster
(`kvpilot.sim.migration_cluster`) feed it the same signals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MigrationConfig(BaseModel):
    """A model's live-migration settings in the router config (`migration:` under a model)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = Field(False, description="migrate automatically; False: only on POST /kvpilot/migrate")
    theta: float = Field(0.8, gt=0, le=4, description="a hot spot is over theta × SLO")
    slo_tpot_ms: float = Field(100, gt=0, alias="tpotMs")
    interval_s: float = Field(1.0, gt=0, alias="intervalSeconds")
    min_remaining_tokens: int = Field(32, ge=1, alias="minRemainingTokens")
    max_moves: int = Field(1, ge=1, alias="maxMovesPerInterval")
    prefill_token_s: float = Field(30e-6, gt=0, alias="prefillTokenSeconds",
                                   description="to turn pending prompt tokens into a backlog time")
    resume_timeout_s: float = Field(30.0, gt=0, alias="resumeTimeoutSeconds",
                                    description="engine vllm: how long a move by resume waits for the target's "
                                                "first token before it gives up (the request stays on the source)")
    # Engine vllm: where a move by resume cuts (kvpilot.router.resume_cut).
    align_cut_tokens: int = Field(
        128, ge=0, alias="alignCutTokens",
        description="engine vllm: a move waits at most this many source tokens for the stream to pass a KV block "
                    "boundary, so the target computes cutSlackTokens + 1 tokens instead of up to a block; "
                    "0: cut at once")
    cut_slack_tokens: int = Field(1, ge=0, alias="cutSlackTokens",
                                  description="engine vllm: tokens past the boundary the cut aims at, steps in "
                                              "which the source's write of the block it filled lands in the store")
    block_size: int | None = Field(None, gt=0, alias="blockSize",
                                   description="engine vllm: the engines' KV block size; None: as each engine "
                                               "reports it (vllm:cache_config_info on /metrics); unknown: no "
                                               "alignment")
    resume_load_wait_s: float = Field(0.05, ge=0, alias="resumeLoadWaitSeconds",
                                      description="engine vllm with kvpilot's connector: how long the target waits "
                                                  "for the source's last blocks to land in the store before it "
                                                  "computes them instead")
    pre_copy: bool = Field(False, alias="preCopy",
                           description="engine vllm: while an aligned cut waits, send the target a 1-token "
                                       "completion of the stream so far, so it holds those blocks before the cut")

    @model_validator(mode="after")
    def _slack_within_a_block(self) -> MigrationConfig:
        if self.block_size is not None and self.cut_slack_tokens >= self.block_size:
            raise ValueError(f"cutSlackTokens ({self.cut_slack_tokens}) must be below blockSize ({self.block_size})")
        return self


@dataclass(slots=True, frozen=True)
class Candidate:
    """A running request the router could move."""

    request_id: str
    kv_tokens: int           # prompt + generated so far: what the copy costs
    remaining_tokens: int    # what is left to generate: what the move gains


@dataclass(slots=True, frozen=True)
class InstanceSignal:
    name: str
    tpot_s: float | None     # predicted time per output token; None: nothing streaming to observe
    backlog_s: float         # predicted queueing delay of the next prefill
    candidates: tuple[Candidate, ...] = ()


@dataclass(slots=True, frozen=True)
class Thresholds:
    theta: float
    slo_tpot_s: float
    slo_ttft_s: float
    min_remaining_tokens: int = 32


@dataclass(slots=True, frozen=True)
class Move:
    request_id: str
    source: str
    target: str
    reason: str              # "tpot" or "backlog"


def pressure(sig: InstanceSignal, th: Thresholds) -> float:
    """Load as a share of the SLO: the larger of TPOT/SLO and backlog/TTFT-SLO."""
    tpot = (sig.tpot_s or 0.0) / th.slo_tpot_s
    return max(tpot, sig.backlog_s / th.slo_ttft_s)


def hot_reason(sig: InstanceSignal, th: Thresholds) -> str | None:
    """Why `sig` is a hot spot (None: it is not)."""
    if sig.tpot_s is not None and sig.tpot_s > th.theta * th.slo_tpot_s:
        return "tpot"
    if sig.backlog_s > th.theta * th.slo_ttft_s:
        return "backlog"
    return None


def plan_migrations(signals: Sequence[InstanceSignal], th: Thresholds, max_moves: int = 1) -> list[Move]:
    """At most one move per hot spot and per target, hottest first, up to `max_moves`."""
    hot = sorted(((pressure(s, th), s, r) for s in signals if (r := hot_reason(s, th)) is not None),
                 key=lambda x: (-x[0], x[1].name))
    cool = sorted((pressure(s, th), s.name) for s in signals
                  if hot_reason(s, th) is None and pressure(s, th) < th.theta / 2)
    moves: list[Move] = []
    for _, sig, reason in hot:
        if len(moves) >= max_moves or not cool:
            break
        movable = [c for c in sig.candidates if c.remaining_tokens >= th.min_remaining_tokens]
        if not movable:
            continue
        victim = min(movable, key=lambda c: (c.kv_tokens, c.request_id))
        _, target = cool.pop(0)
        moves.append(Move(victim.request_id, sig.name, target, reason))
    return moves
