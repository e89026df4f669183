"""The SLO-aware planner's decisions, interval by interval."""

from __future__ import annotations

import dataclasses

import pytest

from kvpilot.autoscaler.planner import PlannerConfig, PoolPlanner, PoolSignals

CFG = PlannerConfig(ttft_slo_s=2.0, tpot_slo_s=0.1, min_replicas=1, max_replicas=10, scale_down_window_s=300,
                    max_step=4, prefill_tps_prior=10_000, decode_seqs_prior=50)


def sig(t: float, current: int, *, ready: int | None = None, tps: float | None = 5_000, seqs: float | None = 20,
        ttft: float | None = 0.5, tpot: float | None = 0.03, att: float | None = 1.0,
        kv: float | None = 0.3) -> PoolSignals:
    return PoolSignals(t, current, current if ready is None else ready, tps, seqs, ttft, tpot, att, kv)


def test_ttft_breach_scales_up_in_one_interval() -> None:
    p = PoolPlanner("prefill", CFG)
    assert p.plan(sig(0, 2, tps=12_000)).desired == 2  # 12k / (10k × 0.8) → 2: steady
    plan = p.plan(sig(15, 2, tps=12_000, ttft=4.0, att=0.6))
    assert plan.desired > 2 and "TTFT" in plan.reason


def test_nothing_scales_down_inside_the_window() -> None:
    p = PoolPlanner("decode", CFG)
    p.plan(sig(0, 6, seqs=250))                    # needs 250 / 40 → 7: up
    for t in range(15, 300, 15):                   # load drops to almost nothing
        plan = p.plan(sig(t, 6, seqs=10))
        assert plan.desired == 6, f"scaled down at t={t}: {plan}"
    plan = p.plan(sig(330, 6, seqs=10))            # the burst has left the window
    assert plan.desired == 2 and "scale down" in plan.reason  # at most max_step at once


def test_bounds_hold() -> None:
    # Far more demand than max_replicas serve, and room in max_step to overshoot (9 + 4 = 13): 10.
    p = PoolPlanner("prefill", CFG)
    assert p.plan(sig(0, 9, tps=1e9, ttft=10.0, att=0.0)).desired == 10
    # No demand at all: down, a window later, by max_step at a time, to min_replicas and no lower.
    floor3 = dataclasses.replace(CFG, min_replicas=3)
    q = PoolPlanner("prefill", floor3)
    sizes = []
    current = 9
    for t in range(0, 1500, 15):
        current = q.plan(sig(t, current, tps=0.0)).desired
        sizes.append(current)
    assert sizes[-1] == 3 and min(sizes) == 3
    # A pool someone scaled below min_replicas is brought back up to it.
    assert PoolPlanner("prefill", floor3).plan(sig(0, 1, tps=0.0)).desired == 3


def test_missing_metrics_hold_the_size() -> None:
    p = PoolPlanner("decode", CFG)
    plan = p.plan(sig(0, 5, seqs=None))
    assert plan.desired == 5 and "missing" in plan.reason
    plan = p.plan(sig(15, 5, ready=3, seqs=None))  # still missing while replicas start
    assert plan.desired == 5 and "starting" in plan.reason


def test_while_replicas_start_only_demand_beyond_the_order_adds_more() -> None:
    p = PoolPlanner("prefill", CFG)
    # 5 asked for, 3 serving and breaching: the breach is what the 2 starting replicas are for.
    plan = p.plan(sig(0, 5, ready=3, tps=30_000, ttft=6.0, att=0.2))
    assert plan.desired == 5 and "starting" in plan.reason
    # Demand outgrows what 5 replicas serve (60k / (10k × 0.8) → 8): more, without waiting a cold start.
    plan = p.plan(sig(10, 5, ready=3, tps=60_000, ttft=6.0, att=0.2))
    assert plan.desired == 8 and "still starting" in plan.reason
    # Turned off, the size is held whatever the demand.
    held = PoolPlanner("prefill", dataclasses.replace(CFG, grow_while_starting=False))
    assert held.plan(sig(0, 5, ready=3, tps=60_000, ttft=6.0, att=0.2)).desired == 5


def test_prefill_heavy_load_grows_prefill_only_and_decode_heavy_decode_only() -> None:
    prefill, decode = PoolPlanner("prefill", CFG), PoolPlanner("decode", CFG)
    # Long prompts, short answers: prefill demand triples, decode is idle.
    heavy_prefill = sig(0, 2, tps=30_000, seqs=10, ttft=3.0, att=0.7)
    assert prefill.plan(heavy_prefill).desired > 2
    assert decode.plan(heavy_prefill).desired == 2
    # Short prompts, long answers: many concurrent sequences, TPOT breached.
    prefill2, decode2 = PoolPlanner("prefill", CFG), PoolPlanner("decode", CFG)
    heavy_decode = sig(0, 2, tps=2_000, seqs=300, tpot=0.2, att=0.6)
    assert prefill2.plan(heavy_decode).desired == 2
    assert decode2.plan(heavy_decode).desired > 2


def test_capacity_is_learned_from_intervals_within_slo() -> None:
    p = PoolPlanner("prefill", CFG)
    for t in range(0, 300, 15):  # 2 replicas comfortably sustain 20k tok/s each within SLO
        p.plan(sig(t, 2, tps=40_000, ttft=0.8))
    assert p.prefill_tps > 15_000
    q = PoolPlanner("prefill", CFG)
    for t in range(0, 300, 15):  # 2 replicas breach the SLO at only 6k tok/s each
        q.plan(sig(t, 2, tps=12_000, ttft=5.0, att=0.5))
    assert q.prefill_tps < 8_000


def test_kv_pressure_adds_a_decode_replica() -> None:
    p = PoolPlanner("decode", CFG)
    plan = p.plan(sig(0, 3, seqs=60, kv=0.97))
    assert plan.desired == 4 and "KV" in plan.reason


def test_scale_out_counts_the_cache_hits_that_remapped_keys_lose() -> None:
    from dataclasses import replace

    # 60k uncached tok/s over 10k × 0.8 per replica → 8 replicas, from 4 ready. Half the keys move,
    # and with them half of the 40k tok/s now served from cache: the cache-aware planner asks for more.
    base = replace(sig(0, 4, tps=60_000, ttft=None, att=None), cached_prompt_tps=None)
    cfg = replace(CFG, max_step=8)
    blind = PoolPlanner("prefill", cfg).plan(base)
    aware = PoolPlanner("prefill", cfg).plan(replace(base, cached_prompt_tps=40_000))
    assert blind.desired == 8
    assert aware.desired == 10 and "remapped" in aware.reason   # (60k + 40k × 4/8) / 8k → 10


def _at(p: PoolPlanner, t: float, current: int, tps: float, waiting: float, seqs: float = 20) -> int:
    s = PoolSignals(t, current, current, tps, seqs, 0.5, 0.03, 1.0, 0.3, waiting, 0.4, tps / 1_000)
    return p.plan(s).desired


def test_a_growing_queue_counts_as_demand_the_pool_did_not_compute() -> None:
    # An overloaded pool computes 15k tok/s (15 prompts of 1k tokens per second) whatever arrives;
    # its queue growing by 10 prompts a second is 10k tok/s more demand than it computed.
    flat, queued = PoolPlanner("prefill", CFG), PoolPlanner("prefill", CFG)
    for t in (0, 10):
        flat_n = _at(flat, t, 2, 15_000, waiting=0)
        queued_n = _at(queued, t, 2, 15_000, waiting=10 * t)
    assert flat_n == 2           # 15k / (10k × 0.8) → 2
    assert queued_n == 4         # (15k + 10 × 1k) / 8k → 4


def test_aggregated_forecast_follows_prompt_demand_not_the_running_queue() -> None:
    cfg = dataclasses.replace(CFG, forecast_s=120, forecast_max_growth=3.0)
    p = PoolPlanner("aggregated", cfg)
    # Prompt demand ramps 2k → 6k tok/s in 20 s (the trend triples it: 18k / 8k → 3 replicas) while
    # 200 sequences run: 200 / (50 × 0.8) → 5. Tripling the sequences too would ask for 15 (10, the max).
    for t, tps in ((0, 2_000), (10, 4_000), (20, 6_000)):
        plan = p.plan(PoolSignals(t, 4, 4, tps, 200, 0.5, None, 1.0, 0.3, 0, 0.4, tps / 1_000))
    assert plan.desired == 5 and "running sequences" in plan.reason


def test_robust_forecast_follows_a_step_but_extrapolates_a_ramp() -> None:
    cfg = dataclasses.replace(CFG, forecast_s=120, forecast_points=4, forecast_robust=True, max_replicas=40,
                              max_step=40)

    def last(levels: tuple[float, ...], c: PlannerConfig = cfg) -> int:
        p = PoolPlanner("prefill", c)
        for i, tps in enumerate(levels):
            n = _at(p, 10 * i, 2, tps, waiting=0)
        return n

    step, ramp = (10_000, 10_000, 10_000, 30_000), (10_000, 20_000, 30_000, 40_000)
    unforecast = dataclasses.replace(cfg, forecast_s=0)
    # One interval's jump from a flat level is a new level to serve, not a trend to extrapolate.
    assert last(step) == last(step, unforecast)
    # A climb over every interval is a trend: 1k tok/s per s for 120 s more, capped at 3 × 40k.
    assert last(ramp) >= 2.5 * last(ramp, unforecast)
    # The least-squares trend (the default) reads the same step as a steep ramp.
    assert last(step, dataclasses.replace(cfg, forecast_robust=False)) >= 2 * last(step, unforecast)


def test_breakout_gate_follows_trends_only_beyond_the_windows_range() -> None:
    cfg = dataclasses.replace(CFG, forecast_s=120, forecast_breakout=True, max_replicas=40, max_step=40)
    p, plain = PoolPlanner("prefill", cfg), PoolPlanner("prefill", dataclasses.replace(cfg, forecast_breakout=False))
    # A plateau that wanders between 20k and 40k tok/s: its upswings stay inside the range it has shown.
    wander = [40_000, 30_000, 20_000, 25_000, 30_000, 35_000]
    for i, tps in enumerate(wander):
        gated, ungated = _at(p, 10 * i, 6, tps, waiting=0), _at(plain, 10 * i, 6, tps, waiting=0)
    assert gated < ungated      # the ungated trend extrapolates the last upswing two cold starts ahead
    # Leaving the range (a new high that keeps climbing) is followed like any trend.
    for i, tps in enumerate((45_000, 55_000), start=len(wander)):
        gated, ungated = _at(p, 10 * i, 6, tps, waiting=0), _at(plain, 10 * i, 6, tps, waiting=0)
    assert gated == ungated > 6


def test_an_aggregated_pool_can_keep_its_raw_prefill_rate_out_of_its_capacity() -> None:
    # Light load, fast first tokens: 1k-token prompts' first tokens in 40 ms say one replica
    # prefills ≥ 25k tok/s when it does nothing else. An aggregated replica also decodes, so that
    # rate (× 0.85 usable) overstates what it sustains under load; it may be left out.
    light = PoolSignals(0, 2, 2, 5_000, 20, 0.05, 0.03, 1.0, 0.3, 0, 0.04, 5.0, ttft_mean_s=0.04)
    counted = PoolPlanner("aggregated", CFG)
    counted.plan(light)
    assert counted.prefill_tps == pytest.approx(25_000 * CFG.prefill_utilisation)
    left_out = PoolPlanner("aggregated", dataclasses.replace(CFG, raw_bound_aggregated=False))
    left_out.plan(light)
    assert left_out.prefill_tps == CFG.prefill_tps_prior     # not busier than planned: nothing learned
    prefill = PoolPlanner("prefill", dataclasses.replace(CFG, raw_bound_aggregated=False))
    prefill.plan(light)
    assert prefill.prefill_tps == pytest.approx(25_000 * CFG.prefill_utilisation)  # it does nothing else


def _mix(t: float, current: int, tps: float, requests_per_s: float, seqs: float = 20) -> PoolSignals:
    return dataclasses.replace(sig(t, current, tps=tps, seqs=seqs), first_tokens_per_s=requests_per_s)


@pytest.mark.parametrize("jump", [0.0, 4.0])
def test_a_jump_in_prompt_tokens_per_request_vetoes_a_scale_down(jump: float) -> None:
    """A window of short prompts (250 tokens per request) asks for one replica; then requests turn
    long (1,500 tokens each, 6×) while so few arrive that the computed tokens still read as one
    replica's worth. On request counts and token totals alike that is a scale-down; the mix has
    moved, and the pool holds its size until it shows what the new mix needs."""
    cfg = dataclasses.replace(CFG, mix_jump=jump)
    p = PoolPlanner("aggregated", cfg)
    for t in range(0, 300, 10):
        assert p.plan(_mix(t, 3, 5_000, 20)).desired == 3      # inside the window: held
    plan = p.plan(_mix(300, 3, 6_000, 4))
    if jump:
        assert plan.desired == 3 and "mix shifting" in plan.reason and "6.0×" in plan.reason
    else:
        assert plan.desired == 1 and "scale down" in plan.reason
    # The same totals at the old mix are no shift: down.
    q = PoolPlanner("aggregated", cfg)
    for t in range(0, 300, 10):
        q.plan(_mix(t, 3, 5_000, 20))
    assert q.plan(_mix(300, 3, 6_000, 24)).desired == 1


def test_a_mix_shift_needs_enough_requests_to_read() -> None:
    """One request in ten seconds is no mix: its size alone says nothing about the next ones."""
    p = PoolPlanner("aggregated", dataclasses.replace(CFG, mix_jump=4.0))
    for t in range(0, 300, 10):
        p.plan(_mix(t, 3, 5_000, 20))
    assert p.plan(_mix(300, 3, 6_000, 0.1)).desired == 1


@pytest.mark.parametrize("shared", [False, True])
def test_an_aggregated_pool_is_sized_on_prefill_and_decode_work_together(shared: bool) -> None:
    """0.6 of a replica's prefill (6k of 10k tok/s) and 0.6 of its decode batch (30 of 50 sequences
    within the TPOT SLO): each alone fits one replica at 80%, together they are 1.2 replicas of
    work (1.5 at 80%). Shared sizing asks for 2; the larger-one rule keeps 1, whose prefill then
    runs beside a decode batch that takes 60% of its steps."""
    p = PoolPlanner("aggregated", dataclasses.replace(CFG, aggregated_work=shared))
    plan = p.plan(sig(0, 1, tps=6_000, seqs=30, tpot=0.06))
    assert plan.desired == (2 if shared else 1)
    if shared:
        assert "shared" in plan.reason and "prefill demand" in plan.reason
    # With no decode load the two rules agree: prefill alone (12k / 8k → 2).
    q = PoolPlanner("aggregated", dataclasses.replace(CFG, aggregated_work=shared))
    assert q.plan(sig(0, 1, tps=12_000, seqs=0, tpot=None)).desired == 2


def test_the_raw_prefill_bound_holds_for_a_mix_of_long_and_short_prompts() -> None:
    """One interval of pd's cross-fade (measured): 14.9 requests/s, 31.8k prompt tok/s, i.e. 2.1k
    tokens per request on average, but most requests short — TTFT p50 22 ms (a short prompt's),
    mean 150 ms (the long ones'). Mean tokens over the median TTFT "proved" 97k tok/s on a replica
    that prefills 33k; over the mean TTFT it is a true lower bound (≤ 33k). The bound is learned
    only when the mean is known."""
    mixed = PoolSignals(520, 8, 8, 31_809, 50, 0.186, 0.03, 1.0, 0.3, 0, 0.0219, 14.9, ttft_mean_s=0.15)
    p = PoolPlanner("aggregated", CFG)
    p.plan(mixed)
    assert 0 < p.prefill_raw <= 33_000
    assert p.prefill_raw == pytest.approx(31_809 / 14.9 / 0.15)
    no_mean = PoolPlanner("aggregated", CFG)
    no_mean.plan(dataclasses.replace(mixed, ttft_mean_s=None))
    assert no_mean.prefill_raw == 0.0


@pytest.mark.parametrize("memory", [0.0, 900.0])
def test_a_pool_keeps_a_reserve_for_the_heaviest_mix_it_served_recently(memory: float) -> None:
    """Ten requests/s of 2,000-token prompts (20k tok/s: 3 replicas at 80% of 10k), then the same
    rate of 100-token prompts (1k tok/s: 1 replica). With a memory, the pool shrinks only to what
    half the heavy mix at today's request rate needs (10k tok/s: 2 replicas); without, to 1. The
    reserve never adds replicas: a pool already at 1 stays there."""
    cfg = dataclasses.replace(CFG, mix_memory_s=memory, mix_reserve=0.5, scale_down_window_s=60)
    p = PoolPlanner("aggregated", cfg)
    assert p.plan(_mix(0, 3, 20_000, 10)).desired == 3
    plan = p.plan(_mix(10, 3, 1_000, 10))
    for t in range(20, 200, 10):
        plan = p.plan(_mix(t, plan.desired, 1_000, 10))
    assert plan.desired == (2 if memory else 1)
    if memory:
        assert "reserve for the heaviest prompt mix" in plan.reason
    q = PoolPlanner("aggregated", cfg)
    for t in range(0, 200, 10):
        q.plan(_mix(t, 1, 20_000 if t == 0 else 1_000, 10))
    assert q.plan(_mix(200, 1, 1_000, 10)).desired == 1
    gone = PoolPlanner("aggregated", dataclasses.replace(cfg, mix_memory_s=memory and 100))
    gone.plan(_mix(0, 3, 20_000, 10))
    plan = gone.plan(_mix(10, 3, 1_000, 10))
    for t in range(20, 400, 10):
        plan = gone.plan(_mix(t, plan.desired, 1_000, 10))
    assert plan.desired == 1                     # the heavy mix has left the memory
