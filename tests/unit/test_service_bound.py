"""The service bounds of bench/service_bound.py and the steady-state reading of bench/sustained.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))   # bench/ is not a package

from service_bound import Work, burst_attainment, fixed_point, ideal_work, service_bound, tight_bound
from sustained import steady_share, sustained_capacity

from kvpilot.sim.families import make_workload
from kvpilot.sim.profiles import get_profile

pytestmark = pytest.mark.unit

PROFILE = get_profile("h100-llama3-8b")
NO_STEP = PROFILE.model_copy(update={"step_s": 1e-12})


def make(rate: float) -> list:  # type: ignore[type-arg]
    return make_workload("agentic", 600, rate, 0)


def test_no_step_cost_and_no_running_kv_is_the_loose_bound_at_that_rate() -> None:
    specs = make(1.0)
    loose = service_bound(specs, NO_STEP, 8, 5.0)
    p = fixed_point(specs, 0.5 * loose.rate, NO_STEP, 8, 5.0, running_kv=False)
    assert p.feasible and p.hit_rate == pytest.approx(loose.ideal_hit_rate)
    rate, _ = tight_bound(lambda r: specs, NO_STEP, 8, 5.0, 0.5 * loose.rate, 1.5 * loose.rate, tol=0.001,
                          running_kv=False)
    assert rate == pytest.approx(loose.rate, rel=0.002)


def test_tight_bound_is_below_the_loose_one_and_each_term_lowers_it() -> None:
    loose = service_bound(make(1.0), PROFILE, 8, 5.0).rate
    no_kv, _ = tight_bound(make, PROFILE, 8, 5.0, 0.3 * loose, 1.2 * loose, running_kv=False)
    tight, p = tight_bound(make, PROFILE, 8, 5.0, 0.3 * loose, 1.2 * loose)
    assert 0 < tight <= no_kv * 1.02 and no_kv < loose
    assert p.feasible and p.batch > 0 and p.running_kv > 0


def test_fixed_point_grows_with_rate_and_fails_past_the_work() -> None:
    specs = make(50.0)
    pts = [fixed_point(specs, r, PROFILE, 8, 5.0) for r in (20.0, 40.0, 60.0)]
    assert all(p.feasible for p in pts)
    assert [p.rho for p in pts] == sorted(p.rho for p in pts)
    assert [p.batch for p in pts] == sorted(p.batch for p in pts)
    assert [p.step_s for p in pts] == sorted(p.step_s for p in pts)
    assert not fixed_point(specs, 1e4, PROFILE, 8, 5.0).feasible


def test_ideal_hits_fall_with_a_smaller_cache() -> None:
    specs = make(50.0)
    big = ideal_work(specs, PROFILE, 8 * PROFILE.kv_capacity_tokens)
    small = ideal_work(specs, PROFILE, 0.05 * PROFILE.kv_capacity_tokens)
    assert small.hit_rate < big.hit_rate and sum(small.total_s) > sum(big.total_s)
    assert all(s >= 1 for s in big.steps)


def _work(arrivals: list[float], size: float) -> Work:
    n = len(arrivals)
    return Work(arrivals, [size] * n, [size] * n, [1] * n, [1.0] * n, 0.0)


def test_burst_attainment_keeps_all_when_spread_and_drops_in_a_burst() -> None:
    assert burst_attainment(_work([float(i) for i in range(10)], 0.5), 1, 1.0) == 1.0
    # 10 requests at once, 1 s each on one server, SLO 3.5 s: 3 make it.
    assert burst_attainment(_work([0.0] * 10, 1.0), 1, 3.5) == pytest.approx(0.3)
    # Twice the servers: each takes 0.5 s, 7 are done by 3.5 s.
    assert burst_attainment(_work([0.0] * 10, 1.0), 2, 3.5) == pytest.approx(0.7)


def test_burst_attainment_drops_the_largest() -> None:
    w = Work([0.0, 0.0, 0.0], [3.0, 1.0, 1.0], [3.0, 1.0, 1.0], [1] * 3, [1.0] * 3, 0.0)
    assert burst_attainment(w, 1, 2.5) == pytest.approx(2 / 3)   # the 3 s one goes, both 1 s ones stay


def test_burst_attainment_is_monotone_in_rate() -> None:
    shares = []
    for rate in (40.0, 80.0, 120.0, 200.0):
        specs = make_workload("agentic", 1500, rate, 0)
        shares.append(burst_attainment(ideal_work(specs, PROFILE, 8 * PROFILE.kv_capacity_tokens), 8, 2.0))
    assert shares == sorted(shares, reverse=True) and shares[-1] < 1.0


def test_steady_share_reads_the_last_third() -> None:
    arrivals = [float(i) for i in range(9)]
    ttfts = [0.1] * 6 + [9.0] * 3
    assert steady_share(arrivals, ttfts, 5.0) == 0.0
    assert steady_share(arrivals, ttfts, 5.0, tail=1.0) == pytest.approx(6 / 9)


def test_sustained_capacity_interpolates_the_first_crossing() -> None:
    assert sustained_capacity([(10.0, 1.0), (20.0, 0.8)]) == pytest.approx(15.0)
    assert sustained_capacity([(10.0, 0.5)]) == 0.0
    assert sustained_capacity([(10.0, 0.95), (20.0, 0.92)]) == 20.0
