"""Profile fitting recovers the step-time coefficients it is given, and never fits negative work."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvpilot.sim.calibrate import Prompts
from kvpilot.sim.calibrate_fit import (
    BusyPoint,
    DecodePoint,
    PrefillPoint,
    ShapePoint,
    fit_profile,
    new_shape_cost,
    nonneg_fit,
)
from kvpilot.sim.profiles import Profile, get_profile


def test_fit_recovers_known_coefficients() -> None:
    step, seq, ctx, tok, pair, overhead = 4e-3, 2e-4, 1e-7, 3e-5, 2e-9, 6e-3
    prefill = [PrefillPoint(n, overhead + step + tok * n + pair * n * n / 2) for n in (64, 128, 256, 512, 768)]
    decode = [DecodePoint(b, c, step + seq * b + ctx * b * c) for b in (1, 2, 4, 8, 16) for c in (40.0, 400.0)]
    p = fit_profile(prefill, decode, name="t", model="m", hardware="h", source="s", block_size=128,
                    kv_capacity_tokens=1024, kv_bytes_per_token=2)
    assert p.step_s == pytest.approx(step, rel=1e-6) and p.decode_seq_s == pytest.approx(seq, rel=1e-6)
    assert p.decode_ctx_s == pytest.approx(ctx, rel=1e-6) and p.prefill_token_s == pytest.approx(tok, rel=1e-6)
    assert p.attn_pair_s == pytest.approx(pair, rel=1e-5) and p.request_overhead_s == pytest.approx(overhead, rel=1e-6)


def test_negative_coefficients_are_dropped_and_refitted() -> None:
    rows = [[1.0, x] for x in (1.0, 2.0, 3.0, 4.0)]
    coef = nonneg_fit(rows, [5.0, 4.9, 4.8, 4.7])   # falling with work: the slope is set to 0
    assert coef[1] == 0 and coef[0] == pytest.approx(4.85)


def test_a_calibrated_profile_file_is_a_simulator_profile(tmp_path: Path) -> None:
    p = fit_profile([PrefillPoint(n, 1e-3 + 1e-5 * n) for n in (10, 100, 1000)],
                    [DecodePoint(b, 50.0, 1e-3 + 1e-4 * b) for b in (1, 4, 16)], name="cal", model="m",
                    hardware="h", source="s", block_size=128, kv_capacity_tokens=4096, kv_bytes_per_token=2)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"profile": p.model_dump(), "points": {}}))
    assert get_profile(str(path)) == p


def test_engine_prefill_times_split_front_end_from_step_time() -> None:
    """With the engine's own prefill time per request, the per-token prefill cost and the front-end's
    fixed and per-token costs come apart (from client TTFTs alone they cannot)."""
    step, seq, tok, pair, overhead, fe_tok = 4e-3, 2e-4, 3e-6, 2e-9, 5e-3, 4e-6
    lengths = (64, 128, 256, 384, 512, 768)
    engine_intercept = 2.5e-3   # the engine core's own step, without the API server's per-token output work
    prefill = [PrefillPoint(n, overhead + fe_tok * n + step + tok * n + pair * n * n / 2,
                            engine_intercept + tok * n + pair * n * n / 2) for n in lengths]
    decode = [DecodePoint(b, c, step + seq * b) for b in (1, 2, 4, 8, 16) for c in (40.0, 400.0)]
    p = fit_profile(prefill, decode, name="t", model="m", hardware="h", source="s", block_size=128,
                    kv_capacity_tokens=1024, kv_bytes_per_token=2, frontend_shares_core=True)
    assert p.prefill_token_s == pytest.approx(tok, rel=1e-5) and p.attn_pair_s == pytest.approx(pair, rel=1e-4)
    assert p.request_overhead_s == pytest.approx(overhead, rel=1e-5)
    assert p.frontend_token_s == pytest.approx(fe_tok, rel=1e-5)
    assert p.frontend_shares_core
    # The client's TTFT is reproduced: front-end + the modelled step.
    for pt in prefill:
        n = pt.prompt_tokens
        modelled = (p.request_overhead_s + p.frontend_token_s * n + p.step_s + p.prefill_token_s * n
                    + p.attn_pair_s * n * n / 2)
        assert modelled == pytest.approx(pt.ttft_s, rel=1e-6)


def test_front_end_fit_on_noisy_points_stays_non_negative() -> None:
    """Engine times that explain more than the client saw (noise) leave no negative front-end cost."""
    prefill = [PrefillPoint(n, 5e-3 + 1e-5 * n, 1e-3 + 1.2e-5 * n) for n in (64, 256, 768)]
    decode = [DecodePoint(b, 100.0, 4e-3 + 1e-4 * b) for b in (1, 4, 16)]
    p = fit_profile(prefill, decode, name="t", model="m", hardware="h", source="s", block_size=128,
                    kv_capacity_tokens=1024, kv_bytes_per_token=2)
    assert p.request_overhead_s >= 0 and p.frontend_token_s >= 0 and not p.frontend_shares_core


def test_new_shape_cost_is_fitted_on_paired_differences_under_drift() -> None:
    """Pairs (a token count's first prefill, then the same count again) give the kernel-building
    cost, fixed and per token, even while the machine's speed drifts between pairs, and the pairs
    that other jobs hit do not move it."""
    rng = random.Random(4)
    fixed, per_token = 2e-3, 1e-5
    pairs = []
    for i in range(30):
        speed = 1.0 + 0.03 * i   # the machine slows down over the run
        n = rng.randint(64, 768)
        base = speed * (2e-3 + 2e-5 * n)
        noise = 3e-2 if i % 8 == 0 else rng.gauss(0, 2e-4)
        pairs.append(ShapePoint(n, base + fixed + per_token * n + noise, base))
    got = new_shape_cost(pairs)
    assert got[0] == pytest.approx(fixed, abs=6e-4) and got[1] == pytest.approx(per_token, rel=0.15)
    assert new_shape_cost([]) == (0.0, 0.0)
    assert new_shape_cost([ShapePoint(100, 1e-3, 2e-3)]) == (0.0, 0.0)   # never negative
    flat = [ShapePoint(n, 5e-3 + 1e-3, 1e-3) for n in (100, 200, 300, 400, 500, 600)]
    assert new_shape_cost(flat) == pytest.approx((5e-3, 0.0), abs=1e-9)


def test_fitted_profile_carries_the_shape_cost() -> None:
    prefill = [PrefillPoint(n, 5e-3 + 1e-5 * n) for n in (64, 256, 768)]
    decode = [DecodePoint(b, 100.0, 4e-3 + 1e-4 * b) for b in (1, 4, 16)]

    def fit(shapes: list[ShapePoint]) -> Profile:
        return fit_profile(prefill, decode, name="t", model="m", hardware="h", source="s", block_size=128,
                           kv_capacity_tokens=1024, kv_bytes_per_token=2, shapes=shapes, shape_cache_size=100)

    assert fit([]).new_shape_s == 0 and fit([]).new_shape_token_s == 0
    p = fit([ShapePoint(n, 4e-3 + 1e-3 + 1e-5 * n, 4e-3) for n in (100, 300, 500)])
    assert p.new_shape_s == pytest.approx(1e-3) and p.new_shape_token_s == pytest.approx(1e-5)
    assert p.shape_cache_size == 100


def test_busy_rounds_give_the_front_end_cost_beyond_the_step_the_request_joins() -> None:
    step, seq, ctx, extra = 4e-3, 1e-4, 1e-7, 3e-3
    prefill = [PrefillPoint(n, 5e-3 + 1e-5 * n) for n in (64, 256, 768)]
    decode = [DecodePoint(b, c, step + seq * b + ctx * b * c) for b in (1, 4, 16) for c in (40.0, 400.0)]

    def joined(n: int, context: float) -> float:   # idle TTFT, half a decode step, the decode alongside
        return 5e-3 + 1e-5 * n + (step + seq + ctx * context) / 2 + seq + ctx * context

    busy = [BusyPoint(n, joined(n, 300.0) + e, 300.0)
            for n, e in ((64, 2e-3), (256, extra), (768, extra), (64, 4e-3), (256, 0.05))]
    busy.append(BusyPoint(999, 1.0, 300.0))   # a count the idle sweep never ran: not compared

    def fit(points: list[BusyPoint], shared: bool = True) -> Profile:
        return fit_profile(prefill, decode, name="t", model="m", hardware="h", source="s", block_size=128,
                           kv_capacity_tokens=1024, kv_bytes_per_token=2, frontend_shares_core=shared, busy=points)

    assert fit(busy).busy_frontend_s == pytest.approx(extra)   # the median: one slow outlier does not move it
    assert fit([]).busy_frontend_s == 0
    assert fit(busy, shared=False).busy_frontend_s == 0   # a front-end on other cores waits on nobody
    faster = [BusyPoint(b.prompt_tokens, b.ttft_s - 0.01, b.context) for b in busy[:5]]
    assert fit(faster).busy_frontend_s == 0   # never negative


def test_prompts_repeat_their_words_in_a_new_order() -> None:
    """Same (tokens, variant): the same words (so the same token count) shuffled (no prefix hit)."""
    prompts = Prompts(random.Random(0), 4.0)
    a, b = prompts.text(300), prompts.text(300)
    assert a != b and sorted(a.split()) == sorted(b.split()) and a.split()[0] == b.split()[0]
    assert sorted(prompts.text(300, variant=1).split()) != sorted(a.split())
    assert abs(len(a) - 1200) < 50
