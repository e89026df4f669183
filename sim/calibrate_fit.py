"""The fitting half of `kvpilot sim calibrate`: measured points in, a simulator `Profile` out.

Pure functions (least squares, the new-shape and busy-front-end costs) over the points that
`kvpilot.sim.calibrate` measures on a live engine; the method, and why each sweep is shaped as it
is, is described there. Apart from the measuring so that the fits can be tested (and re-run on
saved points) without an engine.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kvpilot.sim.profiles import Profile


def lstsq(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least-squares coefficients by the normal equations (a handful of parameters)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(n)]
    for col in range(n):  # Gaussian elimination with partial pivoting
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[piv], b[col], b[piv] = a[piv], a[col], b[piv], b[col]
        if abs(a[col][col]) < 1e-300:
            raise ValueError("singular fit: measure more distinct points")
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
            b[r] -= f * b[col]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        x[i] = (b[i] - sum(a[i][j] * x[j] for j in range(i + 1, n))) / a[i][i]
    return x


def nonneg_fit(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least squares with every coefficient ≥ 0: drop the most negative one and refit until none is
    (and the last of collinear ones, which the sweep cannot tell apart)."""
    active = list(range(len(rows[0])))
    while True:
        try:
            coef = lstsq([[r[i] for i in active] for r in rows], ys) if active else []
        except ValueError:  # collinear features (e.g. one context length only): drop the last one
            del active[-1]
            continue
        worst = min(range(len(active)), key=lambda k: coef[k], default=None)
        if worst is None or coef[worst] >= 0:
            out = [0.0] * len(rows[0])
            for k, i in enumerate(active):
                out[i] = coef[k]
            return out
        del active[worst]


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    prompt_tokens: int
    ttft_s: float
    engine_s: float | None = None   # the engine's own prefill time (vLLM's request_prefill_time_seconds)


@dataclass(frozen=True, slots=True)
class ShapePoint:
    """One pair of prefills of the same token count: the first of that count, then again (its
    kernels built). Times are the engine's own prefill times where exported, else client TTFTs."""
    prompt_tokens: int
    first_s: float
    again_s: float


@dataclass(frozen=True, slots=True)
class BusyPoint:
    """A prefill sent while another request decodes (client TTFT), and that stream's context."""
    prompt_tokens: int
    ttft_s: float
    context: float


@dataclass(frozen=True, slots=True)
class DecodePoint:
    batch: int
    context: float      # mean tokens in each decoding sequence's context
    itl_s: float        # median inter-token latency across the batch


def fit_profile(prefill: Sequence[PrefillPoint], decode: Sequence[DecodePoint], *, name: str, model: str,
                hardware: str, source: str, block_size: int, kv_capacity_tokens: int, kv_bytes_per_token: int,
                max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                frontend_shares_core: bool = False, shapes: Sequence[ShapePoint] = (),
                shape_cache_size: int = 256, busy: Sequence[BusyPoint] = ()) -> Profile:
    fixed, per_token_shape = new_shape_cost(shapes)
    step_s, decode_seq_s, decode_ctx_s = nonneg_fit([[1.0, p.batch, p.batch * p.context] for p in decode],
                                                    [p.itl_s for p in decode])
    step_s = max(step_s, 1e-6)
    rows = [[1.0, p.prompt_tokens, p.prompt_tokens ** 2 / 2] for p in prefill]
    frontend_token_s = 0.0
    if prefill and all(p.engine_s is not None for p in prefill):
        # The engine's own prefill times give the per-token costs; the rest of the client's TTFT
        # beyond the modelled step is the front-end's (fixed + per prompt token).
        _, per_token, quad = nonneg_fit(rows, [p.engine_s or 0.0 for p in prefill])
        rest = [p.ttft_s - (step_s + per_token * p.prompt_tokens + quad * p.prompt_tokens ** 2 / 2) for p in prefill]
        overhead, frontend_token_s = nonneg_fit([[1.0, p.prompt_tokens] for p in prefill], rest)
    else:
        base, per_token, quad = nonneg_fit(rows, [p.ttft_s for p in prefill])
        overhead = max(0.0, base - step_s)
    return Profile(name=name, model=model, hardware=hardware, source=source, kv_bytes_per_token=kv_bytes_per_token,
                   kv_capacity_tokens=kv_capacity_tokens, block_size=block_size, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, step_s=step_s,
                   prefill_token_s=per_token, attn_pair_s=quad, decode_seq_s=decode_seq_s,
                   decode_ctx_s=decode_ctx_s, request_overhead_s=overhead, frontend_token_s=frontend_token_s,
                   frontend_shares_core=frontend_shares_core, new_shape_s=fixed, new_shape_token_s=per_token_shape,
                   shape_cache_size=shape_cache_size,
                   busy_frontend_s=busy_frontend_cost(prefill, busy, step_s, decode_seq_s, decode_ctx_s)
                   if frontend_shares_core else 0.0)


def busy_frontend_cost(prefill: Sequence[PrefillPoint], busy: Sequence[BusyPoint], step_s: float,
                       decode_seq_s: float, decode_ctx_s: float) -> float:
    """What a prefill sent while another request decodes takes beyond what the engine model
    already charges it: the same count's TTFT on an idle engine, half a decode step (it arrives
    mid-step and joins the next), and the decode sharing its step. The median over the points
    whose count the idle sweep also ran; 0 when there are none or it comes out negative."""
    idle = {p.prompt_tokens: p.ttft_s for p in prefill}
    extra = []
    for b in busy:
        if b.prompt_tokens in idle:
            decode = decode_seq_s + decode_ctx_s * b.context
            extra.append(b.ttft_s - idle[b.prompt_tokens] - (step_s + decode) / 2 - decode)
    return max(0.0, statistics.median(extra)) if extra else 0.0


def new_shape_cost(shapes: Sequence[ShapePoint]) -> tuple[float, float]:
    """(fixed, per token): the extra time of a token count's first step over the same count's next
    one (paired, so a drift of the machine's speed between pairs cancels), as a line through the
    medians of the smallest, middle and largest thirds of the counts (robust to pairs that other
    jobs hit); non-negative; (0, 0) without pairs."""
    if not shapes:
        return 0.0, 0.0
    ordered = sorted(shapes, key=lambda p: p.prompt_tokens)
    k = max(1, len(ordered) // 3)
    groups = [ordered[:k], ordered[k:len(ordered) - k], ordered[len(ordered) - k:]] if len(ordered) >= 3 else [ordered]
    rows, ys = [], []
    for g in (g for g in groups if g):
        rows.append([1.0, float(statistics.median(p.prompt_tokens for p in g))])
        ys.append(statistics.median(p.first_s - p.again_s for p in g))
    if len({r[1] for r in rows}) < 2:
        return max(0.0, statistics.mean(ys)), 0.0
    fixed, per_token = nonneg_fit(rows, ys)
    return fixed, per_token
