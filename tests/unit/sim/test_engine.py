"""The engine model's scheduling, caching and timing behaviour."""

from __future__ import annotations

import random

import pytest
from engine_drive import drive

from kvpilot.sim.blocks import BlockPool
from kvpilot.sim.engine import Engine
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.sequence import Phase, Sequence
from kvpilot.tokens import block_hashes, block_text

PROFILE = get_profile("h100-llama3-8b")
BS = 16


def make_seq(rid: str, text: str, max_tokens: int = 8, arrival: float = 0.0) -> Sequence:
    tokens = len(text.encode()) // 4
    return Sequence(rid, arrival, tokens, block_hashes(text, BS), max_tokens)


def run(engine: Engine, t: float = 0.0, until: float = float("inf"), max_steps: int = 1) -> float:
    """Single-threaded driver: step until idle (or `until`); returns the clock."""
    while engine.has_work and t < until:
        plan = engine.schedule(t, max_steps=max_steps)
        assert plan is not None
        t += plan.duration()
        engine.commit(plan, t)
    return t


def test_repeated_prompt_hits_prefix_cache() -> None:
    engine = Engine(PROFILE, block_size=BS)
    text = block_text(1, 256)  # 256 tokens = 16 full blocks
    first = make_seq("a", text)
    engine.add(first)
    run(engine)
    assert first.cached_tokens == 0
    second = make_seq("b", text)
    engine.add(second)
    run(engine)
    # Everything but the last block is reused (one token must be computed to sample from).
    assert second.cached_tokens == 15 * BS
    assert engine.counters.prefix_cache_hits == 15 * BS
    assert engine.counters.prefix_cache_queries == 2 * 256
    # A prompt that shares only the first 128 tokens hits only those blocks.
    third = make_seq("c", text[: 128 * 4] + block_text(2, 128))
    engine.add(third)
    run(engine)
    assert third.cached_tokens == 8 * BS


def test_lru_evicts_least_recently_freed_and_tail_first() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.register(a[0], 100)
    pool.register(a[1], 101)
    b = pool.allocate(2)
    pool.register(b[0], 200)
    pool.register(b[1], 201)
    pool.release(a)  # a freed first → evicted first; its tail (101) before its head (100)
    pool.release(b)
    assert pool.num_available == 4 and pool.num_used == 0
    pool.allocate(1)
    assert 101 not in pool.cached and {100, 200, 201} <= pool.cached.keys()
    pool.allocate(1)
    assert 100 not in pool.cached and {200, 201} <= pool.cached.keys()
    # Reusing a cached block refreshes it: 200 is touched, so 201 goes next.
    hit = pool.match_prefix([200], 1)
    pool.touch(hit)
    pool.release(hit)
    pool.allocate(1)
    assert 201 not in pool.cached and 200 in pool.cached


def test_kv_exhaustion_preempts_and_later_completes() -> None:
    # 40 blocks of 16 = 640 tokens; three requests of 150 prompt + 150 output need 900.
    engine = Engine(PROFILE, block_size=BS, kv_capacity_tokens=640)
    seqs = [make_seq(f"r{i}", block_text(10 + i, 150), max_tokens=150) for i in range(3)]
    for s in seqs:
        engine.add(s)
    run(engine)
    assert engine.counters.num_preemptions > 0
    assert any(s.preemptions > 0 for s in seqs)
    assert all(s.phase == Phase.FINISHED and s.output == 150 for s in seqs)
    assert engine.pool.num_used == 0


def test_new_request_joins_running_batch_mid_decode() -> None:
    engine = Engine(PROFILE, block_size=BS)
    long_runner = make_seq("long", block_text(1, 64), max_tokens=200)
    engine.add(long_runner)
    t = run(engine, until=0.2)
    assert long_runner.phase == Phase.RUNNING and 0 < long_runner.output < 200
    joiner = make_seq("join", block_text(2, 64), max_tokens=5, arrival=t)
    engine.add(joiner)
    plan = engine.schedule(t)
    assert plan is not None
    assert {s.request_id for s, _ in plan.items} == {"long", "join"}
    t += plan.duration()
    engine.commit(plan, t)
    run(engine, t, until=t + 1.0)
    assert joiner.phase == Phase.FINISHED
    assert long_runner.phase == Phase.RUNNING  # still decoding when the joiner left


def test_long_prompt_ttft_exceeds_short() -> None:
    ttft = {}
    for tokens in (256, 8192):
        engine = Engine(PROFILE, block_size=BS)
        seq = make_seq(str(tokens), block_text(tokens, tokens), max_tokens=2)
        engine.add(seq)
        run(engine)
        assert seq.first_token_time is not None
        ttft[tokens] = seq.first_token_time
    assert ttft[8192] > 10 * ttft[256]


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_decode_step_time_grows_with_batch_size(batch: int) -> None:
    def decode_step(b: int) -> float:
        engine = Engine(PROFILE, block_size=BS)
        for i in range(b):
            engine.add(make_seq(f"s{i}", block_text(i, 512), max_tokens=100))
        t = 0.0
        while True:  # finish every prefill
            plan = engine.schedule(t)
            assert plan is not None
            t += plan.duration()
            engine.commit(plan, t)
            if all(s.output > 0 for s in engine.running) and len(engine.running) == b:
                break
        plan = engine.schedule(t)
        assert plan is not None and all(n == 1 for _, n in plan.items)
        return plan.duration()

    assert decode_step(batch * 2) > decode_step(batch)


def test_multi_step_plans_equal_single_stepping() -> None:
    """Virtual time's closed-form decode runs, truncated by arrivals, match step-by-step."""
    rng = random.Random(7)
    arrivals = sorted((rng.uniform(0, 3), i) for i in range(40))

    def simulate(max_steps: int) -> dict[str, tuple[float, float, int]]:
        engine = Engine(PROFILE, block_size=BS, kv_capacity_tokens=20_000)
        seqs = [make_seq(f"r{i}", block_text(i % 5, 64 + 32 * (i % 7)) + block_text(i, 128),
                         max_tokens=20 + 13 * (i % 9), arrival=at) for at, i in arrivals]
        drive(engine, [(at, s) for (at, _), s in zip(arrivals, seqs, strict=True)], max_steps)
        return {s.request_id: (s.first_token_time or -1, s.finish_time or -1, s.cached_tokens) for s in seqs}

    single, multi = simulate(1), simulate(10_000)
    assert single.keys() == multi.keys()
    for rid in single:
        assert multi[rid][0] == pytest.approx(single[rid][0], rel=1e-9, abs=1e-9)
        assert multi[rid][1] == pytest.approx(single[rid][1], rel=1e-9, abs=1e-9)
        assert multi[rid][2] == single[rid][2]


def test_abort_frees_blocks() -> None:
    engine = Engine(PROFILE, block_size=BS)
    seq = make_seq("x", block_text(3, 512), max_tokens=1000)
    engine.add(seq)
    run(engine, until=0.1)
    assert engine.pool.num_used > 0
    engine.abort(seq)
    assert seq.phase == Phase.ABORTED and engine.pool.num_used == 0 and not engine.has_work


def test_prompt_larger_than_cache_is_rejected() -> None:
    engine = Engine(PROFILE, block_size=BS, kv_capacity_tokens=1024)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        engine.add(make_seq("big", block_text(1, 2048)))
