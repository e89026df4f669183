"""`kvpilot demo`: the local control plane under a replayed trace, DualMap against round-robin.

For each policy a fresh `LocalControlPlane` starts (so caches start cold), a load generator
replays the first requests of the Mooncake conversation trace through the router with the
official client's wire format (streaming completions), and the run is summarised: TTFT and TPOT
percentiles, SLO attainment and the workers' prefix-cache hit rate from their own /metrics.
Workers run `time_scale` times faster than the hardware they model; latencies are reported in
the modelled (engine) time, so they read as on the real GPUs.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvpilot import plots
from kvpilot.local import LocalControlPlane, load_service
from kvpilot.sim.cluster import percentile
from kvpilot.sim.workload import RequestSpec, mooncake


@dataclass
class RunResult:
    policy: str
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    errors: int = 0
    hit_rate: float = 0.0
    wall_s: float = 0.0
    ttft_at: list[tuple[float, float]] = field(default_factory=list)   # (modelled s since start, TTFT)
    replicas: list[tuple[float, int]] = field(default_factory=list)    # (modelled s since start, workers)
    scaling: list[str] = field(default_factory=list)                   # the autoscaler's decisions


async def replay(url: str, model: str, specs: list[RequestSpec], time_scale: float, rate_multiplier: float,
                 result: RunResult, progress: Progress, slo_ttft_s: float = 5.0) -> None:
    task = progress.add_task(result.policy, total=len(specs), summary="")
    slo_s = slo_ttft_s
    t_first = specs[0].arrival
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic() + 0.2

        async def one(spec: RequestSpec) -> None:
            at = start + (spec.arrival - t_first) / (rate_multiplier * time_scale)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            sent = time.monotonic()
            first = last = 0.0
            chunks = 0
            body = {"model": model, "prompt": spec.text(), "max_tokens": min(spec.max_tokens, 512), "stream": True}
            try:
                async with session.post(url + "/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        result.errors += 1
                        return
                    async for line in resp.content:
                        if line.startswith(b"data: {") and json.loads(line[6:]).get("choices"):
                            last = time.monotonic()
                            first = first or last
                            chunks += 1
            except aiohttp.ClientError:
                result.errors += 1
                return
            finally:
                done = result.ttft
                ok = sum(1 for t in done if t <= slo_s)
                progress.update(task, advance=1, summary=(
                    f"TTFT p50 {percentile(done, 50):.2f}s · within SLO {ok / max(1, len(done) + result.errors):.0%}"
                    f" · errors {result.errors}") if done else "")
            if chunks:
                result.ttft.append((first - sent) * time_scale)
                result.ttft_at.append(((sent - start) * time_scale, (first - sent) * time_scale))
                if chunks > 1:
                    result.tpot.append((last - first) * time_scale / (chunks - 1))

        await asyncio.gather(*(one(s) for s in specs))


def _hit_rate(worker_urls: list[str]) -> float:
    hits = queries = 0.0
    for url in worker_urls:
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            continue  # retired by the autoscaler a moment ago
        for family in text_string_to_metric_families(text):
            if family.name == "vllm:prefix_cache_hits":
                hits += sum(s.value for s in family.samples if s.name.endswith("_total"))
            elif family.name == "vllm:prefix_cache_queries":
                queries += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return hits / queries if queries else 0.0


def run_demo(spec_path: Path | None = None, *, requests: int = 300, policies: tuple[str, ...] = ("dualmap",
             "round-robin"), time_scale: float = 10.0, rate_multiplier: float = 1.0,
             console: Console | None = None, out_dir: Path | None = None) -> list[RunResult]:
    console = console or Console()
    service = load_service(spec_path)
    slo_s = service.spec.slo.ttft_ms / 1000
    specs = mooncake(limit=requests)
    results = []
    with Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[summary]}"), console=console) as progress:
        for policy in policies:
            result = RunResult(policy)
            with LocalControlPlane(service, time_scale=time_scale, policy=policy) as plane:
                t0, wall0 = time.monotonic(), time.time()
                asyncio.run(replay(plane.url, plane.model, specs, time_scale, rate_multiplier, result, progress,
                                   slo_s))
                result.wall_s = time.monotonic() - t0
                result.hit_rate = _hit_rate(list(plane.workers.values()))
                result.replicas = [(max(0.0, (t - wall0) * time_scale), n) for t, n in plane.replicas]
                result.scaling = [f"{(e.time - wall0) * time_scale:.0f}s {e.pool} {e.before}→{e.after}: {e.reason}"
                                  for e in plane.events]
            results.append(result)
    table = Table(title=f"{len(specs)} Mooncake requests, {service.spec.engine.profile}, "
                        f"{sum(p.replicas for p in service.spec.pools().values())} simulated GPUs, "
                        f"TTFT SLO {slo_s:g}s (latencies in modelled time)")
    for col in ("policy", "ok / errors", "TTFT p50 / p90 / p99 s", "TPOT p50 / p99 ms", "SLO attainment",
                "prefix-cache hit rate", "replicas min / max", "wall s"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in results:
        ok = sum(1 for t in r.ttft if t <= slo_s)
        att = ok / (len(r.ttft) + r.errors) if r.ttft or r.errors else 0.0
        table.add_row(r.policy, f"{len(r.ttft)} / {r.errors}",
                      f"{percentile(r.ttft, 50):.2f} / {percentile(r.ttft, 90):.2f} / {percentile(r.ttft, 99):.2f}",
                      f"{percentile(r.tpot, 50) * 1e3:.0f} / {percentile(r.tpot, 99) * 1e3:.0f}",
                      f"{att:.1%}", f"{r.hit_rate:.1%}",
                      f"{min(n for _, n in r.replicas)} / {max(n for _, n in r.replicas)}" if r.replicas else "–",
                      f"{r.wall_s:.0f}")
    console.print(table)
    for r in results:
        for line in r.scaling:
            console.print(f"  [dim]{r.policy} autoscaler:[/dim] {line}")
    if out_dir is not None:
        for path in plot_demo(results, slo_s, out_dir):
            console.print(f"plot: {path}")
    return results


def plot_demo(results: list[RunResult], slo_s: float, out_dir: Path) -> list[Path]:
    """TTFT over time against the SLO, and replicas over time, one line per policy."""
    fig, (top, bottom) = plots.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1])
    for r in results:
        pts = sorted(r.ttft_at)
        top.plot([t for t, _ in pts], [v for _, v in pts], ".", markersize=3, alpha=0.6, label=r.policy)
        if r.replicas:
            end = max((t for t, _ in pts), default=r.replicas[-1][0])
            steps = [*r.replicas, (end, r.replicas[-1][1])]
            bottom.step([t for t, _ in steps], [n for _, n in steps], where="post", label=r.policy)
    top.axhline(slo_s, color="tab:red", linestyle="--", label=f"TTFT SLO {slo_s:g}s")
    top.set_ylabel("TTFT (s, modelled)")
    top.set_yscale("log")
    top.legend(loc="upper left")
    bottom.set_ylabel("replicas")
    bottom.set_xlabel("time since start (s, modelled)")
    fig.suptitle("kvpilot demo")
    return [plots.save(fig, out_dir / "demo.png", dpi=110)]


def summary_json(results: list[RunResult]) -> list[dict[str, Any]]:
    return [{"policy": r.policy, "ok": len(r.ttft), "errors": r.errors, "ttft_p50_s": percentile(r.ttft, 50),
             "ttft_p99_s": percentile(r.ttft, 99), "hit_rate": r.hit_rate} for r in results]
