"""The elastic cluster disaggregated: a prefill pool and a decode pool, each sized by its own
planner, in the same virtual time as `sim.elastic`.

A request is routed (least loaded) to a serving prefill replica, which computes its prompt and
its first token; the KV then crosses to a decode replica (prompt × KV bytes per token over the
link's bandwidth) where the request joins the batch with its prompt's KV already there
(`external_tokens`: no prefill) and decodes to the end. The client's TTFT is the decode side's
first token, as with vLLM's P/D connectors; what the prefill pool controls is the part up to its
own first token, recorded per request (`Served.prefill_ttft`) so a missed request can be put down
to the pool whose SLO it broke. Each pool's planner sees its own pool's signals: the prefill
planner prompt tokens computed, its queue and its TTFT; the decode planner running sequences,
TPOT and KV usage. GPU time is kept per pool.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

from kvpilot.autoscaler.planner import Planner, PoolSignals
from kvpilot.sim.elastic import (
    ElasticCluster,
    ElasticConfig,
    ElasticReport,
    Replica,
    ScaleRecord,
    pool_signals,
    scale_pool,
    summarize,
)
from kvpilot.sim.sequence import Sequence
from kvpilot.sim.workload import RequestSpec

_HANDOFF = 3  # an event kind beside sim.elastic's STEP, _READY and _TICK
ROLES = ("prefill", "decode")


@dataclass
class PDReport(ElasticReport):
    pool_gpu_seconds: dict[str, float] | None = None
    pool_decisions: dict[str, list[ScaleRecord]] | None = None


class ElasticPDCluster(ElasticCluster):
    """See the module docstring. `planners` maps "prefill" and "decode" to their planners."""

    def __init__(self, config: ElasticConfig, planners: dict[str, Planner], link_gb_s: float = 10.0) -> None:
        super().__init__(config, planners["prefill"])
        self.planners = planners
        self.link_bytes_s = link_gb_s * 1e9           # KV transfer, prefill → decode
        self.role: dict[int, str] = {}                # replica index → pool
        self._max_tokens: dict[str, int] = {}
        self._handoffs: dict[int, Sequence] = {}      # KV in flight, by handoff id
        self._next_handoff = 0
        self._prefill_done: dict[str, float] = {}
        self._acc: dict[str, dict[str, list[float]]] = {r: {"ttft": [], "tpot": []} for r in ROLES}
        self._counted: dict[str, float] = {}
        self._ticked = 0.0

    def _add_role(self, t: float, cold_start: float, role: str) -> None:
        self._add_replica(t, cold_start)
        self.role[len(self.replicas) - 1] = role

    def _pool(self, role: str) -> list[tuple[int, Replica]]:
        return [(i, r) for i, r in enumerate(self.replicas) if self.role[i] == role]

    def _dispatch(self, spec: RequestSpec, t: float) -> None:
        routable = [(i, r) for i, r in self._pool("prefill") if r.serving(t)]
        i, _ = min(routable, key=lambda x: (x[1].load.pending_prefill_tokens, x[1].load.in_flight))
        seq = Sequence(spec.request_id, spec.arrival, spec.prompt_tokens, spec.block_hashes(self.block_size), 1)
        self._max_tokens[spec.request_id] = spec.max_tokens
        self._admit(i, seq, t, spec.prompt_tokens)

    def _advanced(self, idx: int, seq: Sequence, t: float) -> None:
        if self.role[idx] == "prefill":
            if seq.finish_time is None:
                return
            r = self.replicas[idx]
            self._meta.pop(seq)
            r.load.in_flight -= 1
            r.load.pending_prefill_tokens -= seq.prompt_tokens
            self._acc["prefill"]["ttft"].append(t - seq.arrival)
            self._prefill_done[seq.request_id] = t
            hid = self._next_handoff = self._next_handoff + 1
            self._handoffs[hid] = seq
            xfer = seq.prompt_tokens * self.profile.kv_bytes_per_token / self.link_bytes_s
            self.loop.push(t + xfer, _HANDOFF, hid)
            return
        if seq.output == 1:
            self._acc["decode"]["ttft"].append(t - seq.arrival)
        if seq.finish_time is not None:
            self._finished(seq, t, self._acc["decode"]["tpot"],
                           self._prefill_done.pop(seq.request_id, t) - seq.arrival)

    def _handoff(self, hid: int, t: float) -> None:
        done = self._handoffs.pop(hid)
        pool = [(i, r) for i, r in self._pool("decode") if r.serving(t)]
        i, _ = min(pool, key=lambda x: (x[1].load.in_flight, x[1].engine.kv_usage()))
        seq = Sequence(done.request_id, done.arrival, done.prompt_tokens, done.block_hashes,
                       self._max_tokens.pop(done.request_id), external_tokens=done.prompt_tokens)
        self._admit(i, seq, t, 0)                     # its prompt's KV is already there

    def _event(self, kind: int, idx: int, t: float) -> None:
        if kind == _HANDOFF:
            self._handoff(idx, t)
        else:
            super()._event(kind, idx, t)

    def _idle(self) -> bool:
        return not self._meta and not self._handoffs

    def _pool_signals(self, role: str, t: float) -> PoolSignals:
        pool = [r for _, r in self._pool(role)]
        dt = t - self._ticked
        acc = self._acc[role]
        computed = float(sum(r.engine.counters.prompt_tokens_local_compute for r in pool))
        key = f"computed-{role}"
        tps = (computed - self._counted.get(key, 0.0)) / dt if dt > 0 else None
        self._counted[key] = computed
        s = pool_signals(pool, t, dt, acc["ttft"], acc["tpot"], self.config.slo_ttft_s, tps)
        acc["ttft"], acc["tpot"] = [], []
        return s

    def _scale_role(self, role: str, t: float) -> ScaleRecord:
        return scale_pool([r for _, r in self._pool(role)], self.planners[role], self._pool_signals(role, t), t,
                          lambda: self._add_role(t, self.config.cold_start_s, role))

    def run_pd(self, specs: Seq[RequestSpec], initial: dict[str, int]) -> PDReport:
        cfg = self.config
        for role in ROLES:
            for _ in range(initial[role]):
                self._add_role(0.0, 0.0, role)
        arrivals = sorted(specs, key=lambda s: s.arrival)
        decisions: dict[str, list[ScaleRecord]] = {r: [] for r in ROLES}

        def tick(t: float) -> None:
            for role in ROLES:
                decisions[role].append(self._scale_role(role, t))
            self._ticked = t

        end = self._drive(arrivals, tick)
        per = {r: 0.0 for r in ROLES}
        for i, r in enumerate(self.replicas):
            per[self.role[i]] += (r.stopped_at if r.stopped_at is not None else end) - r.asked_at
        both = [ScaleRecord(p.time, p.asked + d.asked, p.ready + d.ready, p.desired + d.desired, "")
                for p, d in zip(decisions["prefill"], decisions["decode"], strict=True)]
        report = PDReport(cfg, self._served, both, sum(per.values()), end, pool_gpu_seconds=per,
                          pool_decisions=decisions)
        report.summary = summarize(report)
        report.summary.update(pd_summary(report))
        return report


def pd_summary(report: PDReport) -> dict[str, float]:
    """Each pool's GPU-hours and mean size, and which SLO the missed requests broke: TTFT with
    the prefill side already over it (the prefill pool's), TTFT lost after the prefill (transfer
    and the decode pool's queue), or TPOT (the decode pool's)."""
    cfg, served = report.config, report.served
    per = report.pool_gpu_seconds or {}
    out: dict[str, float] = {f"{r}_gpu_hours": per.get(r, 0.0) / 3600 for r in ROLES}
    out.update({f"{r}_mean_replicas": per.get(r, 0.0) / report.span_s for r in ROLES if report.span_s})
    missed = [s for s in served if not s.ok]
    out["missed_ttft_at_prefill"] = sum(1 for s in missed if (s.prefill_ttft or 0.0) > cfg.slo_ttft_s)
    out["missed_ttft_after_prefill"] = sum(1 for s in missed if s.ttft > cfg.slo_ttft_s
                                           and (s.prefill_ttft or 0.0) <= cfg.slo_ttft_s)
    out["missed_tpot"] = sum(1 for s in missed if s.ttft <= cfg.slo_ttft_s)
    return out

