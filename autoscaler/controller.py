"""The autoscaler's loop: every interval, for every LLMService in scope with autoscaling on, read
each pool's signals, ask that pool's planner, and hand a changed size to the actuator.

Planners and signal readers live as long as their pool does (they learn capacities and take
deltas between scrapes); a service that turns autoscaling off, or goes away, loses them. Every
decision is logged with its reason, exported as metrics and returned to the caller, which
writes it to the LLMService status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvpilot import vllm_metrics
from kvpilot.autoscaler.actuators import REFUSING, Actuator, PoolRef, PoolState
from kvpilot.autoscaler.planner import (
    WAKE_REASON,
    Plan,
    PlannerConfig,
    PoolPlanner,
    PoolSignals,
    Role,
    wake_plan,
    wake_together,
)
from kvpilot.autoscaler.signals import PromSignals, ScrapeSignals, cold_held
from kvpilot.crds import LLMServiceSpec, PoolSpec
from kvpilot.names import POOL_ROLE_LABEL, pool_name

log = logging.getLogger("kvpilot.autoscaler")
AT_ZERO = "at zero replicas"
NO_PROMETHEUS = "metricsSource is prometheus but the autoscaler was started without --prometheus-url"


@dataclass(slots=True, frozen=True)
class Decision:
    pool: PoolRef
    asked: int
    ready: int
    desired: int
    reason: str
    time: float
    metrics_source: str = "pods"           # where the signals behind it were read (spec.autoscaling.metricsSource)

    @property
    def action(self) -> str:
        return "up" if self.desired > self.asked else "down" if self.desired < self.asked else "hold"


def planner_config(spec: LLMServiceSpec, pool: PoolSpec, base: PlannerConfig) -> PlannerConfig:
    """The planner's knobs for one pool, from the LLMService: SLOs, bounds, the scale-down window."""
    return replace(base, ttft_slo_s=spec.slo.ttft_ms / 1000, tpot_slo_s=spec.slo.tpot_ms / 1000,
                   attainment_target=spec.slo.attainment,
                   min_replicas=pool.min_replicas if pool.min_replicas is not None else base.min_replicas,
                   max_replicas=pool.max_replicas if pool.max_replicas is not None else base.max_replicas,
                   scale_down_window_s=float(spec.autoscaling.scale_down_stabilization_seconds))


class Metrics:
    """What the autoscaler exports: per pool its sizes, each decision by action and the kind of its
    reason (a bounded label; the full text goes to the log and the status), the demand it sized for
    against what a replica sustains, GPU time held and replicas started; per service its SLO, so
    PromQL can count attainment against the same targets (deploy/prometheus/rules.yaml)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        labels = ["namespace", "service", "pool"]
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.desired = Gauge("kvpilot_autoscaler_desired_replicas", "Replicas the planner wants", labels, **kw)
        self.asked = Gauge("kvpilot_autoscaler_current_replicas", "Replicas asked for (spec.replicas)", labels, **kw)
        self.ready = Gauge("kvpilot_autoscaler_ready_replicas", "Replicas serving", labels, **kw)
        self.decisions = Counter("kvpilot_autoscaler_decisions", "Decisions by action (up, down, hold) and what "
                                 "drove them (reason_kind)", [*labels, "action", "reason"], **kw)
        self.demand = Gauge("kvpilot_autoscaler_demand", "Demand the planner sized for (its forecast), by signal: "
                            "prompt_tokens (uncached, per second) or sequences (running)", [*labels, "signal"], **kw)
        self.capacity = Gauge("kvpilot_autoscaler_replica_capacity", "What one replica sustains within the SLO, "
                              "as learned, by signal", [*labels, "signal"], **kw)
        self.gpu_seconds = Counter("kvpilot_autoscaler_gpu_seconds", "GPU time held by the replicas asked for",
                                   labels, **kw)
        self.started = Counter("kvpilot_autoscaler_replicas_started", "Replicas added by scale-ups (cold starts)",
                               labels, **kw)
        self.slo = Gauge("kvpilot_autoscaler_slo_seconds", "The service's latency SLO by kind (ttft, tpot); le: the "
                         "engine histogram's bucket bound at or below it", ["namespace", "service", "slo", "le"], **kw)
        self.slo_target = Gauge("kvpilot_autoscaler_slo_attainment_target", "Share of requests that must meet the "
                                "SLO", ["namespace", "service"], **kw)
        self._last: dict[tuple[str, str, str], float] = {}

    def service(self, namespace: str, name: str, spec: LLMServiceSpec) -> None:
        ttft, tpot = spec.slo.ttft_ms / 1000, spec.slo.tpot_ms / 1000
        self.slo.labels(namespace, name, "ttft", slo_bucket(ttft, vllm_metrics.LATENCY_BUCKETS)).set(ttft)
        self.slo.labels(namespace, name, "tpot", slo_bucket(tpot, vllm_metrics.ITL_BUCKETS)).set(tpot)
        self.slo_target.labels(namespace, name).set(spec.slo.attainment)

    def record(self, d: Decision, gpus: int = 0, planner: PoolPlanner | None = None) -> None:
        key = (d.pool.namespace, d.pool.service, d.pool.role)
        self.desired.labels(*key).set(d.desired)
        self.asked.labels(*key).set(d.asked)
        self.ready.labels(*key).set(d.ready)
        self.decisions.labels(*key, d.action, reason_kind(d.reason)).inc()
        last, self._last[key] = self._last.get(key), d.time
        if last is not None and d.time > last:
            self.gpu_seconds.labels(*key).inc(d.asked * gpus * (d.time - last))
        self.started.labels(*key).inc(max(0, d.desired - d.asked))   # 0 too: the series exists from the start
        if planner is not None:
            tps, seqs = planner.last_forecast
            if planner.role != "decode":
                self.capacity.labels(*key, "prompt_tokens").set(planner.prefill_tps)
                if tps is not None:
                    self.demand.labels(*key, "prompt_tokens").set(tps)
            if planner.role != "prefill":
                self.capacity.labels(*key, "sequences").set(planner.decode_seqs)
                if seqs is not None:
                    self.demand.labels(*key, "sequences").set(seqs)


def slo_bucket(limit: float, bounds: Sequence[float]) -> str:
    """The histogram bucket bound at or below `limit`, as Prometheus prints it: the share of
    observations in that bucket is the share known to meet the SLO."""
    return repr(max((b for b in bounds if b <= limit), default=min(bounds)))


# What drives a decision, as a short label (first match wins): the planner's reason texts.
_REASON_KINDS = ((WAKE_REASON, "wake"), (AT_ZERO, "at_zero"),
                 ("stabilising", "stabilising"), ("TTFT", "ttft_slo"), ("TPOT", "tpot_slo"), ("KV usage", "kv_usage"),
                 ("prefill demand", "prompt_demand"), ("running sequences", "decode_demand"),
                 ("still starting", "starting"), ("metrics missing", "no_metrics"), ("no ready replica", "no_metrics"),
                 ("no demand signal", "no_metrics"), (NO_PROMETHEUS, "no_metrics"))


def reason_kind(reason: str) -> str:
    """The kind of a decision's reason, from a small fixed set, so it can be a metric label."""
    return next((kind for text, kind in _REASON_KINDS if text in reason), "other")


class Autoscaler:
    """One autoscaler for every LLMService it is shown; `tick` is one interval."""

    def __init__(self, actuator: Actuator, *, base: PlannerConfig | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, prometheus_url: str | None = None) -> None:
        self.actuator = actuator
        self.prometheus_url = prometheus_url   # for services whose metricsSource is prometheus
        self.base = base or PlannerConfig()
        self.metrics = metrics
        self.clock = clock
        self._pools: dict[PoolRef, tuple[PoolPlanner, ScrapeSignals]] = {}

    def tick(self, services: Iterable[tuple[str, str, dict[str, Any]]]) -> list[Decision]:
        """`services`: (namespace, name, spec as the API returns it). Returns this interval's decisions."""
        now = self.clock()
        seen: set[PoolRef] = set()
        out: list[Decision] = []
        for namespace, name, raw in services:
            try:
                spec = LLMServiceSpec.model_validate(raw)
            except ValueError as err:
                log.warning("skipping %s/%s: invalid spec: %s", namespace, name, err)
                continue
            if self.metrics is not None:
                self.metrics.service(namespace, name, spec)
            # ray-serve: Ray Serve's autoscaler and KubeRay size the RayService (docs/ray-serve.md)
            if not spec.autoscaling.enabled or spec.engine.type == "ray-serve":
                continue
            mine: dict[str, tuple[Decision, PoolSpec]] = {}
            for role, pool_spec in spec.pools().items():
                ref = PoolRef(namespace, name, role, pool_name(name, role))
                seen.add(ref)
                d = self._decide(ref, spec, pool_spec, now)
                if d is not None:
                    mine[role] = (d, pool_spec)
            out += self._wake_together(mine, now)
        for gone in set(self._pools) - seen:
            del self._pools[gone]
        return out

    def _wake_together(self, mine: dict[str, tuple[Decision, PoolSpec]], now: float) -> list[Decision]:
        """One service's decisions, with every pool at zero woken when another one of it wakes."""
        free = {r: d for r, (d, _) in mine.items() if not d.reason.startswith(REFUSING)}  # not another scaler's
        extra = wake_together({r: d.asked for r, d in free.items()}, {r: d.desired for r, d in free.items()},
                              {r: self._pools[d.pool][0].config for r, d in free.items()})
        out = []
        for role, (d, pool_spec) in mine.items():
            if role in extra:
                planner = self._pools[d.pool][0]
                d = Decision(d.pool, d.asked, d.ready, extra[role], f"{WAKE_REASON}: with the service's other pool "
                             "(a request needs both)", now, d.metrics_source)
                log.info("%s/%s %s: 0 → %d: %s", d.pool.namespace, d.pool.service, role, d.desired, d.reason)
                self.actuator.scale(d.pool, d.desired)
                planner.woke()
                if self.metrics is not None:
                    self.metrics.record(d, pool_spec.gpus, planner)
            out.append(d)
        return out

    def _at_zero(self, ref: PoolRef, state: PoolState, planner: PoolPlanner, now: float) -> Plan:
        """A pool at zero replicas: woken by requests the routers hold for it, else left there
        (or raised to a minReplicas above zero)."""
        config = planner.config
        woken = wake_plan(state.asked, cold_held(state.router_urls, POOL_ROLE_LABEL[ref.role]), config)
        if woken is not None:
            planner.woke()
            return woken
        floor = min(config.min_replicas, config.max_replicas)
        if floor > 0:
            return Plan(floor, f"{AT_ZERO}, below minReplicas {config.min_replicas}")
        return Plan(0, f"{AT_ZERO}: no request held by the router")

    def _plan(self, ref: PoolRef, state: PoolState, entry: tuple[PoolPlanner, ScrapeSignals], source: str,
              now: float) -> Plan:
        """A running pool's plan, from its signals: scraped from its pods, or by PromQL when the
        service's `metricsSource` is prometheus."""
        planner, reader = entry
        if source == "prometheus":
            if not self.prometheus_url:
                return Plan(state.asked, f"holding: {NO_PROMETHEUS}")
            # The pool's pods as Prometheus' Kubernetes discovery labels them (namespace, pod).
            prom = PromSignals(self.prometheus_url, f'namespace="{ref.namespace}",pod=~"{ref.name}-.*"',
                               planner.config.ttft_slo_s)
            signals: PoolSignals | None = prom.read(now, state.asked, state.ready)
        else:
            signals = reader.read(state.metrics_urls, now, state.asked, state.router_urls,
                                  POOL_ROLE_LABEL[ref.role]) if state.metrics_urls else None
        if signals is None:
            if state.unschedulable:
                return Plan(state.asked, f"waiting for GPUs: {state.unschedulable} replica(s) unschedulable; "
                                         "no ready replica to read metrics from")
            return Plan(state.asked, "holding: no ready replica to read metrics from")
        signals = replace(signals, ready=min(signals.ready, state.ready), unschedulable=state.unschedulable)
        return planner.plan(signals)

    def _decide(self, ref: PoolRef, spec: LLMServiceSpec, pool_spec: PoolSpec, now: float) -> Decision | None:
        config = planner_config(spec, pool_spec, self.base)
        entry = self._pools.get(ref)
        if entry is None or entry[0].config != config:
            entry = (PoolPlanner(_role(ref.role), config), ScrapeSignals(config.ttft_slo_s))
            self._pools[ref] = entry
        planner = entry[0]
        state = self.actuator.observe(ref)
        if state is None:
            return None  # the operator has not created the pool yet
        if state.conflict:
            d = Decision(ref, state.asked, state.ready, state.asked, state.conflict, now,
                         spec.autoscaling.metrics_source)
            log.warning("%s/%s %s: %s", ref.namespace, ref.service, ref.role, state.conflict)
            if self.metrics is not None:
                self.metrics.record(d)
            return d
        source = spec.autoscaling.metrics_source
        plan = self._at_zero(ref, state, planner, now) if state.asked == 0 else self._plan(ref, state, entry, source,
                                                                                          now)
        if plan.desired == 0 < state.asked:
            held = cold_held(state.router_urls, POOL_ROLE_LABEL[ref.role])
            if held > 0:   # requests wait for this pool (its replica may not have reached the routers yet)
                plan = Plan(state.asked, f"holding: {held:.0f} request(s) held by the router wait for this pool")
        d = Decision(ref, state.asked, state.ready, plan.desired, plan.reason, now, source)
        if d.action == "hold":
            log.debug("%s/%s %s: %d: %s", ref.namespace, ref.service, ref.role, d.asked, d.reason)
        else:
            log.info("%s/%s %s: %d → %d: %s", ref.namespace, ref.service, ref.role, d.asked, d.desired, d.reason,
                     extra={"service": ref.service, "pool": ref.role, "desired": d.desired})
            self.actuator.scale(ref, d.desired)
        if self.metrics is not None:
            self.metrics.record(d, pool_spec.gpus, planner)
        return d


def _role(role: str) -> Role:
    if role not in ("prefill", "decode", "aggregated"):
        raise ValueError(f"unknown pool role {role!r}")
    return role  # type: ignore[return-value]
