"""Workloads for the simulator: public trace replay and a seeded synthetic generator.

Every prompt is a list of *segments*: ids of fixed-size token blocks (512 tokens, the
Mooncake trace's granularity). Equal leading segments are a shared prefix. Virtual time hashes
segment ids directly (`segment_block_hashes`); the real-time path renders them to text
(`segments_text`), so both see the same prefix structure.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kvpilot.tokens import segment_block_hashes, segments_text

SEGMENT_TOKENS = 512
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


@dataclass(slots=True)
class RequestSpec:
    request_id: str
    arrival: float              # seconds from the start of the workload
    prompt_tokens: int
    max_tokens: int
    segments: list[int]
    segment_tokens: int = SEGMENT_TOKENS
    tenant: str = ""
    _hashes: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def block_hashes(self, block_size: int) -> list[int]:
        cached = self._hashes.get(block_size)
        if cached is None:
            cached = segment_block_hashes(self.segments, self.segment_tokens, self.prompt_tokens, block_size)
            self._hashes[block_size] = cached
        return cached

    def text(self) -> str:
        return segments_text(self.segments, self.segment_tokens, self.prompt_tokens)


def trace_path(*parts: str) -> Path:
    """A file under ../shared/traces (next to the clone), or $KVPILOT_TRACES."""
    root = Path(os.environ.get("KVPILOT_TRACES", TRACES))
    path = root.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"trace not found: {path} (set KVPILOT_TRACES to the traces folder)")
    return path


def mooncake(path: Path | None = None, *, speedup: float = 1.0, limit: int | None = None,
             max_prompt_tokens: int | None = None) -> list[RequestSpec]:
    """Mooncake conversation trace: `hash_ids` are 512-token segments. `speedup` compresses time
    (2.0 = twice the request rate); `max_prompt_tokens` drops longer requests (counted out, not cut)."""
    path = path or trace_path("mooncake", "conversation_trace.jsonl")
    out: list[RequestSpec] = []
    with path.open() as f:
        for i, line in enumerate(f):
            if limit is not None and len(out) >= limit:
                break
            row = json.loads(line)
            tokens = int(row["input_length"])
            if max_prompt_tokens is not None and tokens > max_prompt_tokens:
                continue
            out.append(RequestSpec(f"mc-{i}", row["timestamp"] / 1000.0 / speedup, tokens,
                                   max(1, int(row["output_length"])), list(row["hash_ids"])))
    return out


def azure_conv(path: Path | None = None, *, speedup: float = 1.0, limit: int | None = None,
               seed: int = 0) -> list[RequestSpec]:
    """Azure LLM inference trace (conversation). It has no prompt content, so every request gets
    unique segments: no prefix sharing, as the trace cannot say otherwise."""
    path = path or trace_path("azure_llm_2023", "AzureLLMInferenceTrace_conv.csv")
    out: list[RequestSpec] = []
    t0: datetime | None = None
    next_segment = 1 << 40 | seed << 32
    with path.open() as f:
        for i, row in enumerate(csv.DictReader(f)):
            if limit is not None and i >= limit:
                break
            ts = datetime.fromisoformat(row["TIMESTAMP"][:26])
            t0 = t0 or ts
            tokens = max(1, int(row["ContextTokens"]))
            n = math.ceil(tokens / SEGMENT_TOKENS)
            out.append(RequestSpec(f"az-{i}", (ts - t0).total_seconds() / speedup, tokens,
                                   max(1, int(row["GeneratedTokens"])), list(range(next_segment, next_segment + n))))
            next_segment += n
    return out


@dataclass(slots=True)
class SyntheticConfig:
    """Tenants with their own system prompts, multi-turn sessions, Poisson or Gamma arrivals."""

    requests: int = 1000
    rate: float = 10.0                  # mean new requests per second
    arrival_cv: float = 1.0             # 1 = Poisson; > 1 bursty (Gamma inter-arrivals)
    tenants: int = 8
    tenant_skew: float = 1.1            # Zipf exponent over tenants
    system_prompt_segments: tuple[int, int] = (1, 8)
    turns: tuple[int, int] = (1, 6)     # turns per session
    user_segments: tuple[int, int] = (1, 3)
    output_tokens: tuple[int, int] = (32, 512)
    think_time_s: float = 5.0           # mean gap between a session's turns
    segment_tokens: int = 128
    bursts: list[tuple[float, float, float]] = field(default_factory=list)  # (start s, length s, rate ×)
    seed: int = 0


def synthetic(cfg: SyntheticConfig) -> list[RequestSpec]:
    rng = random.Random(cfg.seed)
    seg_base = 1 << 48 | cfg.seed << 36
    next_seg = seg_base

    def new_segments(n: int) -> list[int]:
        nonlocal next_seg
        out = list(range(next_seg, next_seg + n))
        next_seg += n
        return out

    tenant_prompts = [new_segments(rng.randint(*cfg.system_prompt_segments)) for _ in range(cfg.tenants)]
    weights = [1.0 / (k + 1) ** cfg.tenant_skew for k in range(cfg.tenants)]
    # Session starts by a renewal process; each session's turns follow at think-time gaps.
    shape = 1.0 / max(cfg.arrival_cv, 1e-6) ** 2
    mean_turns = (cfg.turns[0] + cfg.turns[1]) / 2
    session_rate = cfg.rate / mean_turns
    events: list[tuple[float, RequestSpec]] = []
    t = 0.0
    sid = 0
    while len(events) < cfg.requests:
        gap = rng.gammavariate(shape, 1.0 / (shape * session_rate))
        t += gap / _burst_factor(cfg.bursts, t)
        tenant = rng.choices(range(cfg.tenants), weights)[0]
        history = list(tenant_prompts[tenant])
        turn_t = t
        for turn in range(rng.randint(*cfg.turns)):
            history += new_segments(rng.randint(*cfg.user_segments))
            out_tokens = rng.randint(*cfg.output_tokens)
            tokens = len(history) * cfg.segment_tokens
            events.append((turn_t, RequestSpec(f"syn-{sid}-{turn}", turn_t, tokens, out_tokens, list(history),
                                               cfg.segment_tokens, f"tenant-{tenant}")))
            # The answer becomes part of the next turn's prompt.
            history += new_segments(max(1, out_tokens // cfg.segment_tokens))
            turn_t += rng.expovariate(1.0 / cfg.think_time_s)
        sid += 1
    events.sort(key=lambda e: e[0])
    return [spec for _, spec in events[: cfg.requests]]


def _burst_factor(bursts: list[tuple[float, float, float]], t: float) -> float:
    for start, length, factor in bursts:
        if start <= t < start + length:
            return factor
    return 1.0



def superpose(specs: list[RequestSpec], copies: int, *, seed: int = 0) -> list[RequestSpec]:
    """`copies` replays of one trace interleaved over its own span, each shifted by a seeded
    offset (wrapping round), so the rate grows `copies`-fold while the span, the size mix and the
    shape of the arrivals stay the trace's. Each copy gets segments of its own (no false sharing)."""
    if copies < 1:
        raise ValueError("copies must be at least 1")
    if not specs:
        return []
    rng = random.Random(seed)
    span = max(s.arrival for s in specs) + 1e-3
    out: list[RequestSpec] = []
    for c in range(copies):
        shift = 0.0 if c == 0 else rng.uniform(0, span)
        tag = c << 56
        for s in specs:
            out.append(RequestSpec(f"{s.request_id}.{c}", (s.arrival + shift) % span, s.prompt_tokens,
                                   s.max_tokens, [seg ^ tag for seg in s.segments], s.segment_tokens, s.tenant))
    out.sort(key=lambda s: s.arrival)
    return out


def with_bursts(specs: list[RequestSpec], bursts: list[tuple[float, float, float, float]], *,
                seed: int = 0) -> list[RequestSpec]:
    """Inject bursts into a trace. Each burst is (start s, length s, peak factor, ramp s): the
    arrival rate climbs linearly from the trace's own to `factor` times it over `ramp` seconds,
    holds, and falls back over the last `ramp` seconds (ramp 0: a step). Extra requests are
    copies of the window's own requests, placed near them, so a burst has the trace's size mix."""
    rng = random.Random(seed)
    out = list(specs)
    extra = 0
    for start, length, factor, ramp in bursts:
        for s in specs:
            if not start <= s.arrival < start + length:
                continue
            edge = min(s.arrival - start, start + length - s.arrival)
            more = (factor - 1) * (min(1.0, edge / ramp) if ramp > 0 else 1.0)
            copies = int(more) + (1 if rng.random() < more - int(more) else 0)
            for _ in range(copies):
                tag = (1 << 62) | (extra << 40)
                t = min(start + length, max(start, s.arrival + rng.uniform(-1.0, 1.0)))
                out.append(RequestSpec(f"{s.request_id}.b{extra}", t, s.prompt_tokens, s.max_tokens,
                                       [seg ^ tag for seg in s.segments], s.segment_tokens, s.tenant))
                extra += 1
    out.sort(key=lambda s: s.arrival)
    return out


def servegen_shape(days: float = 1.0, *, first_day: int = 0, path: Path | None = None) -> list[float]:
    """ServeGen m-large's aggregate arrival rate per 10-minute window (summed over clients),
    normalised to mean 1, for `days` days starting at `first_day`: a real diurnal shape."""
    root = path or trace_path("servegen", "language_m-large")
    totals: dict[int, float] = {}
    for f in sorted(root.glob("chunk-*-trace.csv")):
        with f.open() as fh:
            for row in csv.reader(fh):
                if row:
                    w = int(float(row[0])) // 600
                    totals[w] = totals.get(w, 0.0) + float(row[1])
    lo = first_day * 144
    series = [totals.get(w, 0.0) for w in range(lo, lo + round(days * 144))]
    mean = sum(series) / len(series)
    if mean <= 0:
        raise ValueError("ServeGen shape is empty over the chosen days")
    return [v / mean for v in series]


def diurnal(shape: list[float], *, window_s: float, mean_rate: float, sizes: list[RequestSpec],
            seed: int = 0) -> list[RequestSpec]:
    """Poisson arrivals whose rate follows `shape` (one value per window of `window_s` seconds,
    mean 1) scaled to `mean_rate` req/s; prompt and output sizes drawn from `sizes` (a trace)."""
    rng = random.Random(seed)
    out: list[RequestSpec] = []
    next_segment = (1 << 60) | (seed << 40)
    for w, level in enumerate(shape):
        rate = level * mean_rate
        t = w * window_s
        end = t + window_s
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= end:
                break
            s = sizes[rng.randrange(len(sizes))]
            n = len(s.segments)
            out.append(RequestSpec(f"dn-{len(out)}", t, s.prompt_tokens, s.max_tokens,
                                   list(range(next_segment, next_segment + n)), s.segment_tokens))
            next_segment += n
    return out
