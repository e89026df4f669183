"""The meter oracle's pure parts: the work meter split per pool, the hold rule, the bisection."""

from __future__ import annotations

import random

import pytest

from kvpilot.autoscaler.planner import PoolSignals
from kvpilot.sim.elastic_oracle import DECODE_BATCH, MeterOracle, bisect_util, work_meter
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.workload import RequestSpec

PROFILE = "h100-llama3-8b"


def _specs(seed: int = 0) -> list[RequestSpec]:
    rng = random.Random(seed)
    return [RequestSpec(f"r{i}", rng.uniform(0, 100), rng.randint(10, 8000), rng.randint(1, 900), [i])
            for i in range(300)]


def test_the_prefill_and_decode_meters_split_the_aggregated_work_exactly() -> None:
    specs = _specs()
    total = work_meter(specs, 100, PROFILE, 10)
    pre = work_meter(specs, 100, PROFILE, 10, "prefill")
    dec = work_meter(specs, 100, PROFILE, 10, "decode")
    assert len(total) == len(pre) == len(dec)
    assert all(abs(p + d - t) < 1e-9 for p, d, t in zip(pre, dec, total, strict=True))
    assert all(p > 0 for p in pre[:10]) and all(d > 0 for d in dec[:10])


def test_prefill_work_is_the_prompt_and_decode_work_the_answer_at_its_context() -> None:
    p = get_profile(PROFILE)
    one = [RequestSpec("a", 12.0, 1000, 200, [1])]
    pre = work_meter(one, 30, PROFILE, 10, "prefill")
    dec = work_meter(one, 30, PROFILE, 10, "decode")
    # It lands in the interval it arrived in (10-20 s), as GPU-seconds per second of that interval.
    assert pre[1] == pytest.approx(1000 * p.prefill_token_s / 10) and pre[0] == pre[2] == 0.0
    per_token = p.decode_seq_s + p.decode_ctx_s * (1000 + 100) + p.step_s / DECODE_BATCH
    assert dec[1] == pytest.approx(200 * per_token / 10)
    # A longer prompt costs the prefill pool more, and the decode pool only through its context.
    longer = work_meter([RequestSpec("b", 12.0, 4000, 200, [1])], 30, PROFILE, 10, "decode")
    assert longer[1] - dec[1] == pytest.approx(200 * p.decode_ctx_s * 3000 / 10)


def _at(t: float) -> PoolSignals:
    return PoolSignals(t, 1, 1, None, None, None, None, None)


def test_the_oracle_holds_the_highest_work_of_its_window_at_its_utilisation() -> None:
    meter = [0.5, 3.1, 0.2, 0.2, 0.2, 0.2, 0.0, 100.0]
    o = MeterOracle(meter, util=0.5, hold_s=30, interval_s=10, max_replicas=32)
    assert o.plan(_at(20)).desired == 7        # ceil(3.1 / 0.5): the reading that ended at 20 s
    assert o.plan(_at(40)).desired == 7        # still inside the 30 s hold
    assert o.plan(_at(50)).desired == 1        # forgotten: ceil(0.2 / 0.5)
    assert o.plan(_at(70)).desired == 1        # nothing arrived: never below one replica
    assert o.plan(_at(80)).desired == 32       # capped


def test_bisection_finds_the_highest_utilisation_that_keeps_the_goal() -> None:
    tried: list[float] = []

    def keeps(u: float) -> bool:
        tried.append(u)
        return u <= 0.7

    best = bisect_util(keeps, 0.2, 1.5, 6)
    assert best is not None and best <= 0.7 and 0.7 - best < 1.3 / 2 ** 6
    assert len(tried) == 6
    assert bisect_util(lambda u: False, 0.2, 1.5, 3) is None
