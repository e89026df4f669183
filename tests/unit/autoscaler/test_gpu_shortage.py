"""Honest under GPU shortage: replicas that cannot schedule are neither waited on nor added to."""

from __future__ import annotations

import dataclasses
import datetime as dt
from types import SimpleNamespace

from kvpilot.autoscaler.actuators import PoolRef, PoolState, unschedulable
from kvpilot.autoscaler.controller import Autoscaler
from kvpilot.autoscaler.planner import PlannerConfig, PoolPlanner, PoolSignals
from kvpilot.crds import LLMServiceSpec

CFG = PlannerConfig(ttft_slo_s=2.0, tpot_slo_s=0.1, min_replicas=1, max_replicas=16, scale_down_window_s=300,
                    max_step=4, prefill_tps_prior=10_000, decode_seqs_prior=50)


def sig(t: float, current: int, ready: int, tps: float, stuck: int = 0) -> PoolSignals:
    return PoolSignals(t, current, ready, tps, 20.0, 0.5, 0.03, 1.0, 0.3, unschedulable=stuck)


def test_no_runaway_scale_up_when_only_five_gpus_exist() -> None:
    """Demand for 15 replicas on a cluster with 5 GPUs: the pool asks for one step beyond what
    runs, then holds there with the shortage in its reason, interval after interval."""
    gpus, p, asked = 5, PoolPlanner("prefill", CFG), 2
    reasons = []
    for k in range(30):
        ready = min(asked, gpus)
        plan = p.plan(sig(10.0 * k, asked, ready, tps=120_000, stuck=asked - ready))
        asked = plan.desired
        reasons.append(plan.reason)
    assert asked <= gpus + CFG.max_step
    assert reasons[-1].startswith("waiting for GPUs: ")
    assert f"{asked - gpus} replica(s) unschedulable" in reasons[-1]


def test_without_the_signal_the_same_pool_waits_on_them_forever() -> None:
    """The bug this fixes: Pending pods read as 'still starting', so nothing is ever decided."""
    p = PoolPlanner("prefill", CFG)
    for k in range(20):
        plan = p.plan(sig(10.0 * k, 9, 5, tps=20_000))  # demand for 3 replicas, 4 "starting"
    assert plan.desired == 9 and "still starting" in plan.reason
    q, asked = PoolPlanner("prefill", CFG), 9
    for k in range(40):                              # the same pool, told that 4 cannot schedule
        asked = q.plan(sig(10.0 * k, asked, min(asked, 5), tps=20_000, stuck=max(0, asked - 5))).desired
    plan = q.plan(sig(400.0, asked, min(asked, 5), tps=20_000, stuck=max(0, asked - 5)))
    assert plan.desired <= 5  # the unschedulable ones are released once demand is below what runs


def test_a_shortage_still_lets_the_pool_shrink_and_releases_pending_pods_first() -> None:
    p = PoolPlanner("prefill", dataclasses.replace(CFG, scale_down_window_s=0.0))
    plan = p.plan(sig(0, 8, 4, tps=25_000, stuck=4))   # runs on 4, which is what 25k needs
    assert plan.desired == 4 and "4 unschedulable replica(s) released" in plan.reason
    plan = p.plan(sig(10, 8, 4, tps=16_000, stuck=4))   # needs 3 (at 65%): one running one goes too
    assert plan.desired == 3
    for k, tps in enumerate((60_000, 200_000, 400_000)):  # wants more than runs: never more than asked
        plan = p.plan(sig(20 + 10 * k, 8, 3, tps=tps, stuck=5))
        assert 3 < plan.desired <= 8 and plan.reason.startswith("waiting for GPUs: 5")


def pod(phase: str, age_s: float, node: str | None = None, scheduled: str = "False") -> SimpleNamespace:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return SimpleNamespace(
        spec=SimpleNamespace(node_name=node),
        metadata=SimpleNamespace(creation_timestamp=now - dt.timedelta(seconds=age_s)),
        status=SimpleNamespace(phase=phase, conditions=[SimpleNamespace(type="PodScheduled", status=scheduled)]))


def test_unschedulable_means_pending_unplaced_past_the_deadline() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert unschedulable(pod("Pending", 300), now, 120)
    assert not unschedulable(pod("Pending", 60), now, 120)                        # still scheduling
    assert not unschedulable(pod("Pending", 300, node="n1", scheduled="True"), now, 120)  # pulling, starting
    assert not unschedulable(pod("Running", 300, node="n1", scheduled="True"), now, 120)


class Short:
    def __init__(self) -> None:
        self.scaled: list[int] = []

    def observe(self, pool: PoolRef) -> PoolState | None:
        return PoolState(3, 0, [], (), 3)

    def scale(self, pool: PoolRef, replicas: int) -> None:
        self.scaled.append(replicas)


def test_controller_says_waiting_for_gpus_when_nothing_could_start() -> None:
    spec = LLMServiceSpec.model_validate({"model": {"name": "m"}, "mode": "aggregated",
                                          "autoscaling": {"enabled": True}}).model_dump(by_alias=True)
    act = Short()
    decisions = Autoscaler(act, clock=lambda: 0.0).tick([("ns", "svc", spec)])
    assert decisions and all(d.desired == 3 and d.reason.startswith("waiting for GPUs: 3") for d in decisions)
    assert act.scaled == []


def test_missing_metrics_during_a_shortage_keep_the_pending_pods_asked_for() -> None:
    """A hold for lack of evidence is no decision to shrink: releasing the Pending pods would only
    ask for them again an interval later (asked size flapping under the shortage)."""
    p = PoolPlanner("prefill", CFG)
    blind = dataclasses.replace(sig(0, 6, 2, tps=0, stuck=4), uncached_prompt_tps=None)
    plan = p.plan(blind)
    assert plan.desired == 6 and plan.reason.startswith("waiting for GPUs: 4") and "holding" in plan.reason
