"""A CPU engine that sat idle pays a wake-up on its next step (`Profile.idle_wakeup_s`)."""

from __future__ import annotations

import pytest

from kvpilot.sim.engine import Engine, Sequence
from kvpilot.sim.profiles import PROFILES, Profile

CPU = Profile(name="cpu", model="m", hardware="h", source="test", kv_bytes_per_token=2, kv_capacity_tokens=1 << 20,
              block_size=128, step_s=4e-3, prefill_token_s=5e-6, attn_pair_s=0.0, decode_seq_s=1e-4,
              decode_ctx_s=0.0, idle_wakeup_s=3e-3, idle_wakeup_after_s=0.02)


def run(profile: Profile, arrivals: list[float], max_steps: int = 1, finish: bool = False) -> list[float]:
    """TTFT (or, with `finish`, end-to-end time) of a 300-token, 20-output request arriving at each
    time; virtual time, one engine."""
    engine = Engine(profile)
    seqs = [Sequence(f"r{i}", t, 300, [], 20) for i, t in enumerate(arrivals)]
    t, k = 0.0, 0
    while k < len(seqs) or engine.has_work:
        while k < len(seqs) and seqs[k].arrival <= t:
            engine.add(seqs[k])
            k += 1
        plan = engine.schedule(t, max_steps)
        if plan is None:
            t = seqs[k].arrival
            continue
        if k < len(seqs):
            engine.truncate(plan, min(t + plan.duration(), seqs[k].arrival))
        t += plan.duration()
        engine.commit(plan, t)
    return [(s.finish_time if finish else s.first_token_time) - s.arrival for s in seqs]   # type: ignore[operator]


def test_a_request_to_an_idle_engine_pays_the_wake_up_and_one_to_a_busy_engine_does_not() -> None:
    cold = dict(idle_wakeup_s=0.0)
    prefill = 4e-3 + 5e-6 * 300
    # Arrivals 1 s apart: the engine is idle before each one, for far longer than 20 ms.
    assert run(CPU, [1.0, 2.0]) == pytest.approx([prefill + 3e-3] * 2)
    assert run(CPU.model_copy(update=cold), [1.0, 2.0]) == pytest.approx([prefill] * 2)
    # The second request arrives while the first decodes: it joins a running engine, no wake-up.
    busy = run(CPU, [1.0, 1.01])
    assert busy[0] == pytest.approx(prefill + 3e-3) and busy[1] < busy[0]


def test_a_short_pause_is_not_an_idle_spell() -> None:
    first = run(CPU, [1.0])[0]
    end = 1.0 + first + 19 * (4e-3 + 1e-4)            # the first request's last decode step
    second = run(CPU, [1.0, end + 0.01])[1]             # 10 ms after it, under the 20 ms threshold
    assert second == pytest.approx(4e-3 + 5e-6 * 300)


def test_the_wake_up_is_paid_once_even_when_decode_steps_are_batched() -> None:
    """Virtual time plans identical decode steps in one go; the wake-up must not repeat in each."""
    single, multi = run(CPU, [1.0, 2.0], finish=True), run(CPU, [1.0, 2.0], max_steps=64, finish=True)
    assert single == pytest.approx(multi)
    assert single[0] == pytest.approx(3e-3 + 4e-3 + 5e-6 * 300 + 19 * (4e-3 + 1e-4))


def test_gpu_profiles_have_no_wake_up() -> None:
    assert all(p.idle_wakeup_s == 0.0 for p in PROFILES.values())
