"""A CPU engine's per-token-count kernel cost (`Profile.new_shape_s`, an LRU of `shape_cache_size`)."""

from __future__ import annotations

import random

import pytest
from engine_drive import drive

from kvpilot.sim.engine import Engine
from kvpilot.sim.profiles import PROFILES, Profile
from kvpilot.sim.sequence import Sequence

CPU = Profile(name="cpu", model="m", hardware="h", source="test", kv_bytes_per_token=2, kv_capacity_tokens=1 << 20,
              block_size=128, step_s=4e-3, prefill_token_s=5e-6, attn_pair_s=0.0, decode_seq_s=1e-4,
              decode_ctx_s=0.0, new_shape_s=5e-3, new_shape_token_s=1e-5, shape_cache_size=4)


def miss(tokens: int) -> float:
    return CPU.new_shape_s + CPU.new_shape_token_s * tokens


def seq(rid: str, prompt: int, max_tokens: int = 1, arrival: float = 0.0) -> Sequence:
    return Sequence(rid, arrival, prompt, [], max_tokens)


def prefill_step(engine: Engine, prompt: int, t: float = 0.0) -> float:
    """Duration of the step that prefills one request of `prompt` tokens alone (run to completion)."""
    engine.add(seq(f"p{prompt}-{t}", prompt))
    plan = engine.schedule(t)
    assert plan is not None
    duration = plan.duration()
    engine.commit(plan, t + duration)
    assert not engine.has_work
    return duration


def test_a_token_count_pays_once_until_it_falls_out_of_the_cache() -> None:
    engine = Engine(CPU)
    warm = CPU.step_s + CPU.prefill_token_s * 300
    assert prefill_step(engine, 300) == pytest.approx(warm + miss(300))
    assert prefill_step(engine, 300) == pytest.approx(warm)
    for n in (301, 302, 303):   # the cache holds 4 counts: 300 is still in it
        prefill_step(engine, n)
    assert prefill_step(engine, 300) == pytest.approx(warm)
    for n in (304, 305, 306, 307):   # 4 newer counts: 300 is out
        prefill_step(engine, n)
    assert list(engine.shapes) == [304, 305, 306, 307]
    assert prefill_step(engine, 300) == pytest.approx(warm + miss(300))


def test_the_count_is_the_whole_step_prefill_and_decodes_together() -> None:
    engine = Engine(CPU)
    old = seq("old", 100, max_tokens=50)
    engine.add(old)
    t = 0.0
    for _ in range(3):   # prefill (count 100), then decodes (count 1)
        plan = engine.schedule(t)
        assert plan is not None
        t += plan.duration()
        engine.commit(plan, t)
    engine.add(seq("new", 200, max_tokens=5, arrival=t))
    plan = engine.schedule(t)
    assert plan is not None and sum(n for _, n in plan.items) == 201
    assert plan.duration() == pytest.approx(CPU.step_s + CPU.prefill_token_s * 200 + CPU.decode_seq_s
                                            + miss(201))
    assert list(engine.shapes) == [100, 1, 201]


def test_virtual_time_multi_step_plans_equal_single_stepping() -> None:
    """A decode run whose first step builds kernels is not folded into a closed-form plan (its cost is
    paid once), so virtual time still equals single-stepping."""
    def simulate(max_steps: int) -> list[tuple[float | None, float | None]]:
        rng = random.Random(3)
        engine = Engine(CPU.model_copy(update={"shape_cache_size": 8}))
        arrivals = sorted((rng.uniform(0, 2), i) for i in range(30))
        seqs = [seq(f"r{i}", rng.randint(20, 60), max_tokens=rng.randint(5, 40), arrival=at) for at, i in arrivals]
        drive(engine, [(at, s) for (at, _), s in zip(arrivals, seqs, strict=True)], max_steps)
        return [(s.first_token_time, s.finish_time) for s in seqs]

    single, multi = simulate(1), simulate(10_000)
    assert multi == [(pytest.approx(a, abs=1e-9), pytest.approx(b, abs=1e-9)) for a, b in single]


def test_off_in_every_gpu_profile_so_their_timings_are_unchanged() -> None:
    assert all(p.new_shape_s == p.new_shape_token_s == 0 for p in PROFILES.values())
    for name in ("h100-llama3-8b", "a100-llama3-8b"):
        base = PROFILES[name]
        results = []
        for profile in (base, base.model_copy(update={"shape_cache_size": 1})):
            engine = Engine(profile)
            rng = random.Random(2)
            seqs = [seq(f"r{i}", rng.randint(64, 2000), max_tokens=rng.randint(1, 30), arrival=i * 0.01)
                    for i in range(40)]
            t = 0.0
            for s in seqs:
                engine.add(s)
            while engine.has_work:
                plan = engine.schedule(t, max_steps=1000)
                assert plan is not None
                t += plan.duration()
                engine.commit(plan, t)
            results.append([(s.first_token_time, s.finish_time) for s in seqs])
            assert not engine.shapes   # no bookkeeping either
        assert results[0] == results[1]
