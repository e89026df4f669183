"""The HPA-like and KPA-like baselines behave as their originals do."""

from __future__ import annotations

from kvpilot.autoscaler.baselines import Concurrency, LatencyThreshold, QueueThreshold
from kvpilot.autoscaler.planner import PoolSignals


def sig(t: float, current: int, waiting: float | None, running: float | None = 0.0) -> PoolSignals:
    return PoolSignals(t, current, current, None, running, None, None, None, waiting=waiting)


def test_queue_threshold_scales_proportionally_with_tolerance_and_window() -> None:
    hpa = QueueThreshold(target_waiting=5, scale_down_window_s=300, max_replicas=20)
    assert hpa.plan(sig(0, 2, waiting=10.5)).desired == 2      # 5.25/replica: inside the 10% band
    assert hpa.plan(sig(15, 2, waiting=40)).desired == 6       # 20/replica → ×4, capped at +4 pods
    assert hpa.plan(sig(30, 6, waiting=60)).desired == 12      # 10/replica → ×2 (the 100% cap)
    assert hpa.plan(sig(45, 12, waiting=120)).desired == 20    # ×2 again, bounded by max_replicas
    assert hpa.plan(sig(60, 8, waiting=0)).desired == 20       # down is held by the window
    assert hpa.plan(sig(400, 8, waiting=0)).desired == 1       # the window has passed
    assert hpa.plan(sig(415, 1, waiting=None)).desired == 1    # missing metrics hold


def test_concurrency_panics_on_a_burst_and_never_scales_down_while_panicking() -> None:
    kpa = Concurrency(target_per_replica=10, stable_window_s=60, panic_window_s=6)
    for t in range(0, 60, 2):
        assert kpa.plan(sig(t, 2, waiting=0, running=20)).desired == 2
    # 80 in flight: the 6 s window averages (20+20+20+80)/4 = 35 → 4 replicas, ≥ 2× current: panic.
    burst = kpa.plan(sig(60, 2, waiting=40, running=40))
    assert burst.desired == 4 and "panic" in burst.reason
    calm = kpa.plan(sig(62, 4, waiting=0, running=10))
    assert calm.desired == 4                                   # still panicking: no scale-down
    current, sizes = 4, []
    for t in range(64, 200, 2):
        current = kpa.plan(sig(t, current, waiting=0, running=10)).desired
        sizes.append(current)
    assert sizes[-1] == 1
    assert 2 in sizes                                          # 4 → 2 → 1: at most halving per step


def test_latency_threshold_is_hpa_arithmetic_on_ttft() -> None:
    keda = LatencyThreshold(target_ttft_s=0.5, scale_down_window_s=60, max_replicas=20)

    def at(t: float, current: int, ttft: float | None) -> int:
        return keda.plan(PoolSignals(t, current, current, None, 0.0, ttft, None, None)).desired

    assert at(0, 4, 0.52) == 4            # inside the 10% band
    assert at(10, 4, 1.5) == 8            # ×3, capped at +100%
    assert at(20, 8, 0.1) == 8            # a healthy pool reads "shrink to 2"; the window holds it
    assert at(90, 8, 0.1) == 2            # ...until the window has passed: the collapse
    assert at(100, 2, None) == 2          # missing metrics hold
