"""Simulator fidelity: the same request mix on real vLLM and on the simulator with a fitted profile.

    .venv/bin/python -P bench/sim_fidelity.py [--rates 2 6] [--requests 60] [--base-url URL --model NAME]

Without --base-url it starts the CPU vLLM of the `vllm` test tier (tiny random Llama,
scripts/vllm-cpu-env.sh; --cpu N pins it to one core). Then:
0. optionally, one request of every prompt length up to --warm-shapes tokens (off by default: the
   CPU engine keeps kernels for only its last ~256 token counts, so this leaves 745-1000 built);
1. `kvpilot.sim.calibrate` measures the engine before the first replay, between replays and after
   the last; one profile is fitted through all their points (written next to the results),
   including `new_shape_s`, the extra time of a step of a token count whose kernels are not built;
2. per rate, its own seeded mix (Poisson arrivals, prompts 64-700 tokens, outputs 16-96 tokens, no
   shared prefixes) is streamed to the engine, recording each request's TTFT and TPOT (client side);
3. the same requests (same arrival offsets, the prompt token counts the engine reported, same
   output lengths) run through the simulator's engine model in virtual time (pinned with --cpu,
   the profile says the API server shares the engine's core: `frontend_shares_core`); the token
   counts whose kernels are built carry over as on the engine: the calibrations' prompt counts and
   each replay's steps, in the order the engine ran them (approximately: a calibration's concurrent
   prompts may share steps);
4. TTFT and TPOT distributions are compared. Goal: medians within 15%.
Results: bench/results/sim_fidelity.md (written by bench/sim_fidelity_report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.sim.calibrate import Measured, engine_cache_info, itl, kv_geometry, make_text, measure, stream_completion
from kvpilot.sim.calibrate_fit import fit_profile
from kvpilot.sim.engine import Engine
from kvpilot.sim.profiles import Profile, get_profile
from kvpilot.sim.sequence import Sequence

sys.path.insert(0, str(Path(__file__).parent))   # bench/ is not a package; -P keeps it off the path
from sim_fidelity_report import write_md


@dataclass(slots=True)
class Req:
    arrival: float
    prompt_chars: int
    max_tokens: int
    prompt_tokens: int = 0
    ttft: float = 0.0
    tpot: float | None = None


def mix(n: int, rate: float, chars_per_token: float, seed: int) -> list[Req]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(Req(t, int(rng.randint(64, 700) * chars_per_token), rng.randint(16, 96)))
    return out


async def run_real(base_url: str, model: str, reqs: list[Req], seed: int) -> None:
    rng = random.Random(seed)
    prompts = [make_text(rng, r.prompt_chars) for r in reqs]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()

        async def one(r: Req, prompt: str) -> None:
            await asyncio.sleep(max(0.0, r.arrival - (time.perf_counter() - start)))
            t = await stream_completion(session, base_url, model, prompt, r.max_tokens)
            r.prompt_tokens, r.ttft, r.tpot = t.prompt_tokens, t.ttft_s, itl(t)

        await asyncio.gather(*(one(r, p) for r, p in zip(reqs, prompts, strict=True)))


def run_sim(profile: Profile, reqs: list[Req], seed: int, shapes: OrderedDict[int, None] | None = None,
            built: Iterable[int] = ()) -> list[tuple[float, float | None, float]]:
    """Single-step virtual time over the simulator's engine: arrivals join at the next step.

    With `profile.frontend_shares_core` (a pinned CPU engine) the engine model serializes each
    request's front-end work with the steps; otherwise it runs elsewhere and only adds to TTFT.
    `shapes`: the step token counts the engine has built kernels for (`Profile.new_shape_s`), carried
    from one replay to the next as the real engine carries them; updated in place. `built`: counts
    the real engine ran since (the calibration before this replay), recorded first.
    Per request: (TTFT, TPOT, prefill: scheduled to first token, as vLLM's histogram counts it)."""
    rng = random.Random(seed)
    engine = Engine(profile)
    if shapes is not None:
        engine.shapes = shapes
    engine.mark_built(built)
    pending = sorted(enumerate(reqs), key=lambda x: x[1].arrival)
    seqs: dict[int, Sequence] = {}
    t, k = 0.0, 0
    while k < len(pending) or engine.has_work:
        while k < len(pending) and pending[k][1].arrival <= t:
            i, r = pending[k]
            hashes = [rng.getrandbits(63) for _ in range(r.prompt_tokens // engine.block_size)]
            seqs[i] = Sequence(f"r{i}", r.arrival, r.prompt_tokens, hashes, r.max_tokens)
            engine.add(seqs[i])
            k += 1
        plan = engine.schedule(t)
        if plan is None:
            t = pending[k][1].arrival
            continue
        t += plan.duration()
        engine.commit(plan, t)
    out: list[tuple[float, float | None, float]] = []
    for i, r in enumerate(reqs):
        s = seqs[i]
        assert s.first_token_time is not None and s.finish_time is not None
        ttft = s.first_token_time - r.arrival + (0.0 if profile.frontend_shares_core else engine.frontend_s(s))
        tpot = (s.finish_time - s.first_token_time) / (r.max_tokens - 1) if r.max_tokens > 1 else None
        assert s.first_scheduled is not None
        own = engine.frontend_s(s) if profile.frontend_shares_core else 0.0   # before vLLM's engine core sees it
        out.append((ttft, tpot, s.first_token_time - s.first_scheduled - own))
    return out


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q / 100 * len(v)))]


async def main_async(args: argparse.Namespace) -> None:
    args.load_before = os.getloadavg()[0]
    if args.nice is not None:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # the client's timestamps matter as much
    server = None
    base_url, model = args.base_url, args.model
    if base_url is None:
        from kvpilot.testing.vllm import VLLMServer

        server = VLLMServer.tiny(name="fidelity", workdir=Path(tempfile.mkdtemp(prefix="kvpilot-fidelity-")),
                                 cpu=args.cpu, nice=args.nice)
        base_url, model = server.url, "tiny"
    pid = None if server is None else server.proc.pid
    try:
        info = engine_cache_info(base_url)
        block_size, capacity = kv_geometry(info)
        probe = await _chars_per_token(base_url, model)
        args.warm_s = await warm_shapes(base_url, model, args.warm_shapes) if args.warm_shapes else 0.0
        shapes: OrderedDict[int, None] = OrderedDict()   # the simulated engine's built token counts
        warmed = list(range(1, args.warm_shapes + 1))
        ran: set[int] = set(warmed)   # token counts the engine has run (the new-count pairs avoid them)
        # Calibrate before the first replay, between replays and after the last; the simulator runs
        # every replay with one profile fitted to all calibrations' points (the engine's speed
        # drifts within minutes on a shared machine, and one calibration can be an outlier: a
        # profile averaged over two, per rate, was once 45% off in its decode step).
        measured: list[Measured] = []
        before: list[list[int]] = []     # per replay: the counts of the calibration just before it
        runs: list[tuple[float, int, list[Req], float, float, dict[str, float]]] = []
        cal_s = 0.0
        for index, rate in enumerate(args.rates):
            # Each rate draws its own mix: with one seed for all, a later rate's prompts had the
            # earlier one's token counts, whose kernels the CPU engine had just built.
            seed = args.seed + index
            reqs = mix(args.requests, rate, probe, seed)
            if args.profile is None and not measured:
                cal_s += await calibrate(args, base_url, model, ran, measured)
            before.append((warmed if index == 0 else []) + (measured[-1].counts if measured else []))
            t0 = time.perf_counter()
            m0, w0 = server_latencies(base_url), others_on_core_s(pid, args.cpu)
            await run_real(base_url, model, reqs, seed)
            real_s = time.perf_counter() - t0
            cpu_wait = (others_on_core_s(pid, args.cpu) - w0) / real_s
            breakdown = per_request_ms(m0, server_latencies(base_url))
            breakdown["client_ttft"] = 1e3 * statistics.mean(r.ttft for r in reqs)
            runs.append((rate, seed, reqs, real_s, cpu_wait, breakdown))
            # The replay's steps: a prompt alone or with a few decodes alongside.
            ran.update(r.prompt_tokens + k for r in reqs for k in range(9))
            if args.profile is None:
                cal_s += await calibrate(args, base_url, model, ran, measured)
        if args.profile is not None:  # reuse a calibration (e.g. to re-run only the replays)
            profile, spread = get_profile(str(args.profile)), (0.0, 0.0)
        else:
            pooled = Measured.pooled(measured)
            profile = fit(args, pooled, block_size, capacity, cal_s, len(measured))
            spread = disagreement([fit(args, m, block_size, capacity, cal_s, 1) for m in measured])
            print(json.dumps(profile.model_dump(), indent=1), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            (args.out.parent / "sim_fidelity_profile.json").write_text(json.dumps(pooled.document(profile),
                                                                                  indent=1))
        profile = profile.model_copy(update={"frontend_shares_core": args.cpu is not None})
        rows, replays = [], []
        for (rate, seed, reqs, real_s, cpu_wait, breakdown), counts in zip(runs, before, strict=True):
            sim = run_sim(profile, reqs, seed, shapes, counts)
            real_ttft = [r.ttft for r in reqs]
            real_tpot = [r.tpot for r in reqs if r.tpot is not None]
            sim_ttft = [s[0] for s in sim]
            sim_tpot = [s[1] for s in sim if s[1] is not None]
            row = {"rate": rate, "requests": len(reqs), "real_s": real_s, "breakdown": breakdown,
                   "cpu_wait": cpu_wait,
                   "sim_ttft_mean": 1e3 * statistics.mean(sim_ttft),
                   "sim_prefill_mean": 1e3 * statistics.mean(x[2] for x in sim),
                   "ttft": [statistics.median(real_ttft), statistics.median(sim_ttft),
                            pct(real_ttft, 90), pct(sim_ttft, 90)],
                   "tpot": [statistics.median(real_tpot), statistics.median(sim_tpot),
                            pct(real_tpot, 90), pct(sim_tpot, 90)]}
            rows.append(row)
            replays.append({"rate": rate, "profile": profile.model_dump(), "requests": [
                [r.arrival, r.prompt_tokens, r.max_tokens, r.ttft, r.tpot] for r in reqs]})
            print(json.dumps(row), flush=True)
        write_md(args, profile, spread, len(measured), rows, cal_s)
        # What the real engine did, per request, with the profile each rate was simulated with: a
        # model change can be re-checked against it offline (`run_sim`), without the engine.
        (args.out.parent / "sim_fidelity_replay.json").write_text(json.dumps(replays))
    finally:
        if server is not None:
            server.stop()


LATENCIES = ("time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds")


def others_on_core_s(root: int | None, cpu: int | None) -> float:
    """CPU time the engine's core spent on anything but the engine's processes (root and its
    descendants), steal included: other jobs' share of the core, 0 on an idle machine."""
    if root is None or cpu is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    engine_ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid in stats:
            engine_ticks += int(stats[pid][11]) + int(stats[pid][12])  # utime, stime
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name == f"cpu{cpu}":
            v = [int(x) for x in values]
            busy = sum(v) - v[3] - v[4]   # all but idle and iowait
            return (busy - engine_ticks) / tick
    return 0.0


def server_latencies(base_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of vLLM's own latency histograms: TTFT as the API server sees it (from the
    request's arrival in the input processor), time queued in the scheduler, and prefill (scheduled
    to first token, inside the engine core)."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {name: (0.0, 0.0) for name in LATENCIES}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix("vllm:")
        if name not in out:
            continue
        total = sum(s.value for s in family.samples if s.name.endswith("_sum"))
        count = sum(s.value for s in family.samples if s.name.endswith("_count"))
        out[name] = (total, count)
    return out


def per_request_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {k: 1e3 * (after[k][0] - before[k][0]) / max(1.0, after[k][1] - before[k][1]) for k in LATENCIES}


def disagreement(profiles: list[Profile]) -> tuple[float, float]:
    """How far the run's calibrations, each fitted alone, are apart: (max − min) / mean of a single
    decode step's and of a 400-token request's modelled TTFT (front-end included)."""
    def decode(p: Profile) -> float:
        return p.step_s + p.decode_seq_s + p.decode_ctx_s * 400

    def prefill(p: Profile) -> float:
        return (p.request_overhead_s + p.frontend_token_s * 400 + p.step_s + p.prefill_token_s * 400
                + p.attn_pair_s * 400 * 400 / 2)

    def spread(values: list[float]) -> float:
        return (max(values) - min(values)) / max(1e-9, statistics.mean(values))

    return spread([decode(p) for p in profiles]), spread([prefill(p) for p in profiles])


async def calibrate(args: argparse.Namespace, base_url: str, model: str, ran: set[int],
                    measured: list[Measured]) -> float:
    """Measure the engine once more (appended to `measured`); returns the seconds it took."""
    t0 = time.perf_counter()
    # A new seed each time: the new-count pairs must not repeat an earlier calibration's counts,
    # nor any count the engine ran lately (`ran`: the replays' steps, the calibrations' prompts).
    m = await measure(base_url, model, prompt_lengths=[64, 128, 256, 384, 512, 768], batches=[1, 2, 4, 8, 16],
                      decode_prompts=[32, 384], decode_tokens=48, repeats=args.repeats,
                      seed=args.seed + 1000 * (len(measured) + 1), shape_pairs=args.shape_pairs, ran=ran,
                      busy_rounds=args.repeats if args.cpu is not None else 0)
    measured.append(m)
    ran.update(m.counts)
    return time.perf_counter() - t0


def fit(args: argparse.Namespace, m: Measured, block_size: int, capacity: int, cal_s: float,
        calibrations: int) -> Profile:
    return fit_profile(m.prefill, m.decode, name="cpu-tiny-llama", model="tiny random Llama (820k params)",
                       hardware=args.hardware, block_size=block_size, kv_capacity_tokens=capacity,
                       kv_bytes_per_token=2 * 2 * 2 * 32 * 4,  # 2 layers × (K, V) × 2 KV heads × 32 × fp32
                       source=f"measured: bench/sim_fidelity.py, {calibrations} calibration(s), {cal_s:.0f} s",
                       frontend_shares_core=args.cpu is not None, shapes=m.shapes, busy=m.busy)


async def warm_shapes(base_url: str, model: str, max_tokens: int) -> float:
    """One request of every prompt length up to `max_tokens` (random token ids: no prefix hits).
    The CPU engine pays several ms extra on a step of a token count whose kernels it has not built
    (`Profile.new_shape_s`); it keeps them for its last ~256 counts only, so this does not make a
    mix of unique lengths fast: kept as an option to show that. Returns seconds taken."""
    rng = random.Random(5)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        for n in range(1, max_tokens + 1):
            body = {"model": model, "prompt": [rng.randrange(10, 4000) for _ in range(n)], "max_tokens": 1}
            async with session.post(base_url.rstrip("/") + "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                await resp.read()
    return time.perf_counter() - t0


async def _chars_per_token(base_url: str, model: str) -> float:
    async with aiohttp.ClientSession() as session:
        t = await stream_completion(session, base_url, model, make_text(random.Random(1), 3000), 2)
    return 3000 / max(1, t.prompt_tokens)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 6.0])
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=0,
                        help="pin the engine (API server included) to this core; -1: vLLM's own binding")
    parser.add_argument("--nice", type=int, help="run engine and client at this niceness (negative needs root)")
    parser.add_argument("--profile", type=Path, help="skip calibration: use this profile JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-shapes", type=int, default=0,
                        help="first send one request of each prompt length up to this (0: none)")
    parser.add_argument("--shape-pairs", type=int, default=24,
                        help="calibration pairs measuring a new token count's extra step time (0: not modelled)")
    parser.add_argument("--hardware", default="2-core x86_64 dev machine (AVX-512)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sim_fidelity.md"))
    args = parser.parse_args()
    args.cpu = None if args.cpu < 0 else args.cpu
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
