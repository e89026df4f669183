"""The engine's side of live migration: pause keeps a request's state and blocks, resume and
adopt continue it from the same position, so a moved request ends exactly as an unmoved one."""

from __future__ import annotations

import pytest

from kvpilot.sim.engine import Engine
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.sequence import Phase, Sequence
from kvpilot.tokens import block_hashes, block_text

PROFILE = get_profile("h100-qwen2.5-0.5b")


def seq(rid: str = "r", prompt: int = 100, max_tokens: int = 20) -> Sequence:
    return Sequence(rid, 0.0, prompt, block_hashes(block_text(3, prompt), 16), max_tokens)


def step(engine: Engine, t: float) -> float:
    plan = engine.schedule(t)
    assert plan is not None
    t += plan.duration()
    engine.commit(plan, t)
    return t


def test_pause_freezes_a_request_even_mid_step_and_resume_continues_it() -> None:
    e, s = Engine(PROFILE), seq()
    e.add(s)
    t = 0.0
    while s.output < 5:
        t = step(e, t)
    plan = e.schedule(t)           # a step is in flight when the pause comes
    e.pause(s)
    blocks, output = list(s.blocks), s.output
    assert plan is not None
    e.commit(plan, t + plan.duration())
    assert (s.output, s.blocks, s.phase, e.num_running) == (output, blocks, Phase.PAUSED, 0)
    assert not s.finished and e.pool.num_used == len(blocks)
    e.resume(s)
    while e.has_work:
        t = step(e, t)
    assert s.output == 20 and s.phase == Phase.FINISHED and e.pool.num_used == 0
    with pytest.raises(ValueError):
        e.pause(s)


def test_adopt_continues_a_paused_request_on_another_engine_without_prefill() -> None:
    src, dst, s = Engine(PROFILE), Engine(PROFILE), seq(max_tokens=30)
    src.add(s)
    t = 0.0
    while s.output < 10:
        t = step(src, t)
    src.pause(s)
    moved = Sequence(s.request_id, t, s.prompt_tokens, s.block_hashes, s.max_tokens)
    moved.output, moved.computed = s.output, s.computed
    src.abort(s)
    assert src.pool.num_used == 0 and s.finished
    dst.adopt(moved)
    plan = dst.schedule(t)
    assert plan is not None and plan.items == [(moved, 1)]   # a decode step, not a prefill
    while dst.has_work:
        t = step(dst, t)
    assert moved.output == 30 and dst.counters.generation_tokens == 20
    assert dst.pool.match_prefix(s.block_hashes, 99)          # its prompt blocks are now cached here


def test_adopt_refuses_when_there_is_no_room_or_the_request_is_not_decoding() -> None:
    tiny = Engine(PROFILE, kv_capacity_tokens=64)
    big = seq(prompt=200)
    big.output, big.computed = 3, 202
    assert not tiny.can_adopt(big.computed)
    with pytest.raises(ValueError):
        tiny.adopt(big)
    with pytest.raises(ValueError):
        Engine(PROFILE).adopt(seq())   # never ran: nothing to continue from
