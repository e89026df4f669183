"""The front-end stage of a CPU engine whose API server shares its core (`frontend_shares_core`)."""

from __future__ import annotations

import random
import statistics

import pytest

from kvpilot.sim.engine import Engine
from kvpilot.sim.profiles import PROFILES, Profile
from kvpilot.sim.sequence import Phase, Sequence

CPU = Profile(name="cpu", model="m", hardware="h", source="test", kv_bytes_per_token=2, kv_capacity_tokens=1 << 20,
              block_size=128, step_s=4e-3, prefill_token_s=5e-6, attn_pair_s=0.0, decode_seq_s=1e-4,
              decode_ctx_s=0.0, request_overhead_s=5e-3, frontend_token_s=2e-6, frontend_shares_core=True)


def seq(rid: str, arrival: float, prompt: int = 300, max_tokens: int = 20) -> Sequence:
    return Sequence(rid, arrival, prompt, [], max_tokens)


def replay(profile: Profile, arrivals: list[tuple[float, Sequence]]) -> float:
    """Single-step virtual time: arrivals are added when the clock reaches them (between steps)."""
    engine = Engine(profile)
    t, k = 0.0, 0
    while k < len(arrivals) or engine.has_work:
        while k < len(arrivals) and arrivals[k][0] <= t:
            engine.add(arrivals[k][1])
            k += 1
        plan = engine.schedule(t)
        if plan is None:
            t = arrivals[k][0]
            continue
        t += plan.duration()
        engine.commit(plan, t)
    return t


def ttft(s: Sequence) -> float:
    assert s.first_token_time is not None
    return s.first_token_time - s.arrival


def test_idle_engine_spends_the_front_end_time_before_the_prefill_step() -> None:
    a = seq("a", 0.0, prompt=300)
    replay(CPU, [(0.0, a)])
    frontend = CPU.request_overhead_s + CPU.frontend_token_s * 300
    assert ttft(a) == pytest.approx(frontend + CPU.step_s + CPU.prefill_token_s * 300)
    assert Engine(CPU).frontend_s(a) == pytest.approx(frontend)


def test_a_request_arriving_mid_decode_joins_the_next_step_lengthened_by_its_front_end_work() -> None:
    engine = Engine(CPU)
    old = seq("old", 0.0, max_tokens=50)
    engine.add(old)
    t = 0.0
    while old.output < 3:  # front-end + prefill, then decodes: `old` is decoding
        plan = engine.schedule(t)
        assert plan is not None
        t += plan.duration()
        engine.commit(plan, t)
    new = seq("new", t - 1e-3)   # arrived during the last step
    engine.add(new)
    assert engine.num_waiting == 0 and engine.has_work   # in the API server, not yet in the engine's queue
    plan = engine.schedule(t)
    assert plan is not None and plan.frontend == [new]
    assert {s.request_id for s, _ in plan.items} == {"old", "new"}
    step = CPU.step_s + CPU.decode_seq_s + CPU.prefill_token_s * 300
    assert plan.duration() == pytest.approx(engine.frontend_s(new) + step)   # the shared core does both
    decode_before = old.output
    t += plan.duration()
    engine.commit(plan, t)
    assert old.output == decode_before + 1 and new.output == 1


def test_a_busy_engine_charges_the_busy_front_end_cost_an_idle_one_does_not() -> None:
    busy = CPU.model_copy(update={"busy_frontend_s": 3e-3})
    alone = seq("alone", 0.0)
    replay(busy, [(0.0, alone)])
    assert ttft(alone) == pytest.approx(CPU.request_overhead_s + CPU.frontend_token_s * 300 + CPU.step_s
                                        + CPU.prefill_token_s * 300)   # found the engine idle: no extra
    firsts = []
    for profile in (CPU, busy):
        old, new = seq("old", 0.0, max_tokens=50), seq("new", 0.1)   # `old` decodes until ≈ 0.24 s
        replay(profile, [(0.0, old), (0.1, new)])
        firsts.append((ttft(new), old.finish_time))
    (plain_ttft, plain_finish), (busy_ttft, busy_finish) = firsts
    assert busy_ttft == pytest.approx(plain_ttft + 3e-3)
    assert busy_finish == pytest.approx((plain_finish or 0.0) + 3e-3)   # on the shared core: others wait too


def test_front_end_work_queues_behind_and_ahead_of_steps_as_the_rate_grows() -> None:
    """Against the same costs counted in TTFT only (a front-end on other cores), the shared core
    changes nothing when requests never overlap, and delays first tokens (other requests' front-end
    work runs first) and decode steps when they do."""
    def gaps(rate: float) -> tuple[float, float]:
        out = []
        for shared in (True, False):
            rng = random.Random(1)
            t, arrivals = 0.0, []
            for i in range(200):
                t += rng.expovariate(rate)
                arrivals.append((t, seq(f"r{i}", t, prompt=rng.randint(64, 700), max_tokens=rng.randint(16, 96))))
            profile = CPU.model_copy(update={"frontend_shares_core": shared})
            replay(profile, arrivals)
            engine = Engine(profile)
            extra = 0.0 if shared else 1.0
            tpots = [((s.finish_time or 0.0) - (s.first_token_time or 0.0)) / (s.max_tokens - 1) for _, s in arrivals]
            out.append((statistics.mean(ttft(s) + extra * engine.frontend_s(s) for _, s in arrivals),
                        statistics.median(tpots)))
        return out[0][0] - out[1][0], out[0][1] - out[1][1]

    low, high = gaps(0.5), gaps(20.0)
    assert abs(low[0]) < 0.05 * CPU.step_s and abs(low[1]) < 0.05 * CPU.step_s
    assert high[0] > 0.25 * CPU.step_s and high[1] > 0.1 * CPU.step_s


def test_off_by_default_so_gpu_profiles_time_as_before() -> None:
    assert not any(p.frontend_shares_core or p.busy_frontend_s for p in PROFILES.values())
    base = PROFILES["h100-llama3-8b"]
    costly = base.model_copy(update={"request_overhead_s": 0.05, "frontend_token_s": 1e-4})
    times = []
    for profile in (base, costly):
        rng = random.Random(2)
        arrivals = [(i * 0.01, seq(f"r{i}", i * 0.01, prompt=rng.randint(64, 2000))) for i in range(50)]
        end = replay(profile, arrivals)
        times.append((end, [(s.first_token_time, s.finish_time) for _, s in arrivals]))
    assert times[0] == times[1]


def test_abort_in_the_front_end_stage() -> None:
    engine = Engine(CPU)
    a, b = seq("a", 0.0), seq("b", 0.0)
    engine.add(a)
    engine.add(b)
    engine.abort(a)
    plan = engine.schedule(0.0)
    assert plan is not None and plan.frontend == [b]
    engine.abort(b)   # aborted while its front-end work and prefill run
    engine.commit(plan, plan.duration())
    assert a.phase == b.phase == Phase.ABORTED and not engine.has_work
