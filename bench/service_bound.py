"""A workload's service bounds: request rates on a fleet that routing cannot raise.

**The loose bound** (`service_bound`, round 2): replay the requests, in arrival order, through one
global LRU holding the whole fleet's KV (`instances` × the profile's capacity), counting each
request's leading hits before inserting it. With those ideal hits the profile's cost model gives
each request's GPU work (prefill of the uncached tokens, causal attention over the context,
decode of the output, and *no* fixed step cost), and the fleet serves at most
instances / mean work. Also reported: the share of requests whose prefill alone (with ideal hits)
exceeds the TTFT SLO.

**The tight bound** (`tight_bound`, round 3) adds what the loose one leaves out, each derived
from the workload at the rate in question (`make(rate)`: the same sessions closer together,
so more of them are under way at once and compete for the cache):

1. *Hits at that rate.* The LRU replay is of the workload at rate λ, not at 1 req/s: at a higher
   rate more sessions interleave between two turns of one, and an LRU of the same size keeps less
   of each.
2. *KV held by running requests.* A running request pins its prompt's blocks: they are hits for
   others but cannot be evicted until it finishes. In the replay each request pins its blocks from
   its arrival for the least time it can run, its n steps × the step length d of item 3 (no
   queueing), and the LRU only has the room the pinned blocks leave. (The loose bound let the
   LRU evict a long-running request's prompt as if it were finished: on Mooncake a 10k-token
   prompt with 300 output tokens runs ~15 s, while ~100 other requests arrive.) n is
   ⌈u / max_num_batched_tokens⌉ prefill steps + output − 1, u its uncached prompt tokens.
3. *The fixed step cost.* Every engine step costs `step_s` besides its tokens' work, and a
   request is in n̄ steps. An instance busy all the time (the best case: near capacity it never
   idles) runs steps of d = step_s / (1 − ρ) seconds, ρ = λ / instances × w̄ being the share of
   its time that token work takes; its batch is then B = λ / instances × n̄ × d (Little's law
   over steps). Capacity needs ρ < 1, B ≤ max_num_seqs, the pinned KV < capacity, and a step
   shorter than the TTFT SLO (a request's first token comes at the end of a step).
   (Sound for a work-conserving engine: a router that holds requests back makes batches no
   larger; one that releases them in bulk to grow the batch pays the wait in TTFT.)

Hits (1, 2) and the step length (3) depend on each other: replay without pins, compute ρ, d and
B, replay with pins of n × d, until d settles (it only grows; the iteration stops when it changes
by < 1% or a condition fails; "running KV" is the mean pinned KV per instance at arrivals).
The tight bound is the highest λ at which the fixed point exists (bisection on λ; feasibility is
monotone in λ because ρ, d, B and the pins all grow with it, and hits only fall). With `step_s`
≈ 0 and no pins it is the loose bound at each rate (`tests/unit/test_service_bound.py`).

It still flatters every router: one LRU over all instances (no partition), ideal LRU order,
prefill of all requests at the cost model's rate, and no burst: the fixed point is a long-run
mean. `burst_attainment` adds the arrivals' own timing: the whole fleet as one server of
instances × the speed (no router can do better than pooling), each request's work, served in
arrival order (every request's deadline is its arrival + the SLO, so earliest-deadline-first is
arrival order), dropping the largest kept request of the current busy period whenever one would
be late (Moore-Hodgson's rule: a dropped request is served after everyone, at no cost to the
others). The work is either the prefill only (`prefill_only=True`: decodes are free, a
relaxation, so a bound) or all of it (decodes not deferred past later requests' prefills, as
vLLM's running-first scheduler does not defer them: an estimate, not a bound). The share kept
is what the pooled server gets within the SLO under that rule (believed optimal for equal
relative deadlines, not proved here); read with prefill only and below 90% at some rate, no
router reaches 90% attainment there.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvpilot.sim.profiles import Profile
from kvpilot.sim.workload import RequestSpec


@dataclass(slots=True)
class Bound:
    rate: float              # req/s: the fleet's service rate with ideal cache hits
    ideal_hit_rate: float    # token share served from the global LRU
    too_long: float          # share of requests whose prefill alone (with ideal hits) exceeds the SLO


@dataclass(slots=True)
class Work:
    """Per-request costs with the ideal hits of one replay (lists in arrival order)."""

    arrival: list[float]
    prefill_s: list[float]   # uncached prefill + its attention, no step cost
    total_s: list[float]     # prefill + decode, no step cost
    steps: list[int]         # engine steps the request is in
    kv_steps: list[float]    # Σ over its steps of the private KV tokens it holds then
    hit_rate: float
    pinned_tokens: float = 0.0   # mean KV tokens pinned by running requests (fleet), at arrivals


def ideal_work(specs: Sequence[RequestSpec], profile: Profile, cache_tokens: float, step_s: float = 0.0) -> Work:
    """Replay `specs` through one LRU of `cache_tokens` and price each request's work. With
    `step_s` > 0, a request pins its prompt's blocks from its arrival until it has run its steps
    of `step_s` each (no queueing: the least time any schedule keeps it): pinned blocks are hits
    for others but cannot be evicted, and they take their room out of the LRU's."""
    seg = specs[0].segment_tokens if specs else 1
    capacity = max(0, int(cache_tokens // seg))
    lru: OrderedDict[int, None] = OrderedDict()
    pinned: dict[int, int] = {}                 # block → running requests holding it
    ends: list[tuple[float, int, list[int]]] = []  # (finish, order, its blocks)
    w = Work([], [], [], [], [], 0.0)
    hit_tokens = prompt_tokens = pinned_sum = 0.0
    budget = profile.max_num_batched_tokens
    for k, s in enumerate(sorted(specs, key=lambda r: r.arrival)):
        while ends and ends[0][0] <= s.arrival:    # finished: its blocks become cache (most recent)
            _, _, done = heapq.heappop(ends)
            for h in reversed(done):
                pinned[h] -= 1
                if not pinned[h]:
                    del pinned[h]
                    lru[h] = None
                    lru.move_to_end(h)
        hashes = s.block_hashes(seg)   # chained: equal hash ⇒ equal prefix up to there
        n = len(hashes)
        c = 0
        while c < n and (hashes[c] in lru or hashes[c] in pinned):
            c += 1
        cached = min(s.prompt_tokens - 1, c * seg)
        u = s.prompt_tokens - cached
        prefill = u * profile.prefill_token_s + profile.attn_pair_s * u * (cached + u / 2)
        out = s.max_tokens
        decode = out * (profile.decode_seq_s + profile.decode_ctx_s * (s.prompt_tokens + out / 2))
        steps = math.ceil(u / budget) + out - 1
        w.arrival.append(s.arrival)
        w.prefill_s.append(prefill)
        w.total_s.append(prefill + decode)
        w.steps.append(steps)
        w.kv_steps.append(u + (out - 1) * u + (out - 1) * out / 2)
        hit_tokens += cached
        prompt_tokens += s.prompt_tokens
        if step_s > 0:
            for h in hashes:
                lru.pop(h, None)
                pinned[h] = pinned.get(h, 0) + 1
            heapq.heappush(ends, (s.arrival + steps * step_s, k, hashes))
            pinned_sum += len(pinned)
        else:
            # Tail first, so the head is the most recent (the engines evict tails first too).
            for h in reversed(hashes):
                if h in lru:
                    lru.move_to_end(h)
                else:
                    lru[h] = None
        while lru and len(lru) + len(pinned) > capacity:
            lru.popitem(last=False)
    w.hit_rate = hit_tokens / prompt_tokens if prompt_tokens else 0.0
    w.pinned_tokens = pinned_sum * seg / len(w.arrival) if w.arrival else 0.0
    return w


def service_bound(specs: list[RequestSpec], profile: Profile, instances: int, slo_ttft_s: float) -> Bound:
    """The loose bound (round 2): ideal hits of an LRU of the whole fleet's KV, no step cost."""
    if not specs:
        return Bound(0.0, 0.0, 0.0)
    w = ideal_work(specs, profile, instances * profile.kv_capacity_tokens)
    too_long = sum(1 for p in w.prefill_s if p > slo_ttft_s)
    return Bound(instances * len(specs) / sum(w.total_s), w.hit_rate, too_long / len(specs))


@dataclass(slots=True)
class Point:
    """The fixed point of hits, step length and batch at one rate (per instance)."""

    rate: float
    feasible: bool
    why: str                 # the condition that failed, "" when feasible
    rho: float               # share of an instance's time in token work
    step_s: float            # mean step length d
    batch: float             # mean running requests B
    running_kv: float        # private KV tokens they hold, K
    hit_rate: float
    work: Work | None


def fixed_point(specs: Sequence[RequestSpec], rate: float, profile: Profile, instances: int, slo_ttft_s: float,
                running_kv: bool = True, rounds: int = 12) -> Point:
    """Items 1-3 of the module docstring at one rate (`specs` are the workload at `rate`)."""
    cap = profile.kv_capacity_tokens
    pt = Point(rate, False, "no requests", 0.0, 0.0, 0.0, 0.0, 0.0, None)
    if not specs:
        return pt
    lam = rate / instances
    d = 0.0   # step length the pins last for; 0: no pins (first round)
    for _ in range(rounds):
        w = ideal_work(specs, profile, instances * cap, d if running_kv else 0.0)
        n = len(w.total_s)
        wbar = sum(w.total_s) / n
        nbar = sum(w.steps) / n
        rho = lam * wbar
        pt = Point(rate, False, "", rho, math.inf, math.inf, w.pinned_tokens / instances, w.hit_rate, w)
        if rho >= 1:
            pt.why = "token work alone fills the GPUs"
            return pt
        d_new = profile.step_s / (1 - rho)
        b = lam * nbar * d_new
        pt.step_s, pt.batch = d_new, b
        if b > profile.max_num_seqs:
            pt.why = "batch over max_num_seqs"
            return pt
        if pt.running_kv >= cap:
            pt.why = "running requests' KV over capacity"
            return pt
        if d_new > slo_ttft_s:
            pt.why = "a step longer than the SLO"
            return pt
        if not running_kv or abs(d_new - d) <= 0.01 * d_new:
            pt.feasible = True
            return pt
        d = max(d, d_new)   # pins only grow with d, hits only fall: d is non-decreasing
    pt.feasible = True   # converging slowly but every condition held at every round
    return pt


def tight_bound(make: Callable[[float], Sequence[RequestSpec]], profile: Profile, instances: int, slo_ttft_s: float,
                lo: float, hi: float, tol: float = 0.02, running_kv: bool = True) -> tuple[float, Point]:
    """The highest rate in [lo, hi] at which `fixed_point` holds (bisection, relative `tol`);
    `make(rate)` gives the workload at that rate. Returns (rate, the point there); rate 0 if
    even `lo` fails, `hi` if `hi` holds."""
    best = fixed_point(make(lo), lo, profile, instances, slo_ttft_s, running_kv)
    if not best.feasible:
        return 0.0, best
    top = fixed_point(make(hi), hi, profile, instances, slo_ttft_s, running_kv)
    if top.feasible:
        return hi, top
    while hi / lo > 1 + tol:
        mid = math.sqrt(lo * hi)
        p = fixed_point(make(mid), mid, profile, instances, slo_ttft_s, running_kv)
        if p.feasible:
            lo, best = mid, p
        else:
            hi = mid
    return lo, best


def burst_attainment(w: Work, instances: int, slo_ttft_s: float, step_share_s: float = 0.0,
                     prefill_only: bool = False) -> float:
    """Share of requests a pooled server of `instances` × the speed gets within the SLO, in arrival
    order, dropping the largest kept request of the busy period when one would be late (module
    docstring). A request's size: its prefill (`prefill_only`) or all its work plus
    `step_share_s` (its share of step cost at the fixed point's batch)."""
    n = len(w.arrival)
    if not n:
        return math.nan
    sizes = w.prefill_s if prefill_only else [t + step_share_s for t in w.total_s]
    finish = -math.inf      # when the kept work so far is done
    heap: list[float] = []  # kept sizes (negated) of the current busy period
    dropped = 0
    for a, p, pre in zip(w.arrival, sizes, w.prefill_s, strict=True):
        if a >= finish:     # idle before it: a new busy period
            heap = []
            finish = a
        finish += p / instances
        heapq.heappush(heap, -p)
        # Its first token: when its prefill is done (its decode, and whatever follows, after).
        if finish - (p - pre) / instances > a + slo_ttft_s:
            # Late: drop the largest kept request of the busy period (it may be this one).
            finish = max(a, finish + heapq.heappop(heap) / instances)
            dropped += 1
    return 1 - dropped / n


def main() -> None:
    """`python -P bench/service_bound.py --workload agentic --seed 1 [--profile ...] [--slo 5 2]`:
    the loose bound, the tight bound (with and without the running requests' KV) and the burst
    check at rates around them, as a Markdown table."""
    import argparse
    import sys
    import time

    from kvpilot.sim.families import make_workload
    from kvpilot.sim.profiles import get_profile

    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="agentic")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", default="h100-llama3-8b")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--slo", type=float, nargs="+", default=[5.0, 2.0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals replayed per rate")
    parser.add_argument("--requests", type=int, default=3000, help="at least this many (mooncake: exactly: the slice)")
    parser.add_argument("--grid", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.0],
                        help="burst check at these fractions of the tight bound")
    parser.add_argument("--bracket", type=float, nargs=2, default=[0.5, 1.1],
                        help="bisect the tight bound between these fractions of the loose one")
    parser.add_argument("--tol", type=float, default=0.02, help="relative width the bisection stops at")
    args = parser.parse_args()
    profile = get_profile(args.profile)
    n_fixed = args.workload == "mooncake"

    def make(rate: float) -> list[RequestSpec]:
        n = args.requests if n_fixed else max(args.requests, math.ceil(rate * args.duration))
        return make_workload(args.workload, n, rate, args.seed)

    t0 = time.perf_counter()
    print(f"`{' '.join(['.venv/bin/python', '-P', *sys.argv])}`\n")
    loose = service_bound(make(1.0), profile, args.instances, min(args.slo))
    slo = min(args.slo)   # the SLO only enters through "a step longer than the SLO"
    lo, hi = (f * loose.rate for f in args.bracket)
    no_kv, p0 = tight_bound(make, profile, args.instances, slo, lo, hi, args.tol, running_kv=False)
    tight, p1 = tight_bound(make, profile, args.instances, slo, lo, hi, args.tol)
    print(f"{args.workload}, seed {args.seed}, {args.instances} × {args.profile}: loose bound {loose.rate:.1f} req/s "
          f"(ideal hits {loose.ideal_hit_rate:.1%} at 1 req/s); hits at the rate + step cost: {no_kv:.2f} "
          f"(hits {p0.hit_rate:.1%}, step {p0.step_s * 1e3:.0f} ms, batch {p0.batch:.0f}); + running requests' KV: "
          f"**{tight:.2f}** (hits {p1.hit_rate:.1%}, step {p1.step_s * 1e3:.0f} ms, batch {p1.batch:.0f}, "
          f"running KV {p1.running_kv / 1e3:.0f}k of {profile.kv_capacity_tokens / 1e3:.0f}k tokens/instance; "
          f"bisected to {args.tol:.1%}: the next rate up fails)\n")
    print("| rate (req/s) | × tight | fixed point | ideal hits | " +
          " | ".join(f"pooled within {s:g} s: prefill only / all work" for s in args.slo) + " |")
    print("|---:|---:|---|---:|" + "---:|" * len(args.slo))
    for f in args.grid:
        rate = f * tight
        p = fixed_point(make(rate), rate, profile, args.instances, slo)
        if p.work is None:
            continue
        cells = " | ".join(f"{burst_attainment(p.work, args.instances, s, prefill_only=True):.1%} / "
                           f"{burst_attainment(p.work, args.instances, s):.1%}" for s in args.slo)
        state = "holds" if p.feasible else p.why
        print(f"| {rate:.1f} | {f:.2f} | {state} | {p.hit_rate:.1%} | {cells} |", flush=True)
    print(f"\n(wall {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
