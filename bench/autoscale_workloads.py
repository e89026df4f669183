"""The autoscaler benchmark's workloads, each a function of (minutes, seed).

Seed 0 is the development instance (bursty and diurnal: exactly round 1's workloads); the
results are reported on other seeds, which nothing was tuned on (bench/results/autoscale.md).

- bursty: the Azure LLM 2023 conversation trace, six seeded superposed replays (≈ 33 req/s)
  and three injected bursts (3×, 2.5×, 3× for 6 min, 2-min ramps). A seed moves the replays'
  offsets and the bursts' copies.
- diurnal: ServeGen m-large's aggregate daily shape compressed into the span, Poisson at 50
  req/s mean, Azure sizes. Seed 0 is day 9 (round 1's); seed k is day 9 + k, a different day.
- burstgpt: what the BurstGPT paper (Wang et al., 2024) reports for ChatGPT conversation logs:
  Gamma-distributed inter-arrival times whose shape (< 1: burstier than Poisson) and rate change
  over time, and Zipf-distributed request sizes (P(n) ∝ n^-a). Here: 2-minute segments, each with
  its own Gamma shape in [0.25, 1] and a log-normal rate around 22 req/s, one in eight a 2.5-3.5×
  burst; prompt tokens Zipf a = 1.1 over [32, 8192] (mean ≈ 1,200, like Azure's); output sizes
  from the Azure trace.
- ramp: a slow linear ramp from 8 to 55 req/s over the span, Poisson, Azure sizes.
- pd: prefill and decode demand moving apart: four phases, alternately long prompts with short
  answers (3-6k prompt tokens, 8-48 out) and short prompts with long answers (100-400 in, 400-900
  out), with 2-minute cross-fades, Poisson at 14 req/s.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from kvpilot.sim.workload import (
    SEGMENT_TOKENS,
    RequestSpec,
    azure_conv,
    diurnal,
    servegen_shape,
    superpose,
    with_bursts,
)

DEV_SEED = 0


def bursty(minutes: float, seed: int = DEV_SEED) -> list[RequestSpec]:
    base = [s for s in azure_conv() if s.arrival < minutes * 60]
    span = minutes * 60
    bursts = [(span * f, 360.0, k, 120.0) for f, k in ((0.15, 3.0), (0.45, 2.5), (0.75, 3.0))]
    return with_bursts(superpose(base, 6, seed=1 + 10 * seed), bursts, seed=2 + 10 * seed)


def daily(minutes: float, seed: int = DEV_SEED) -> list[RequestSpec]:
    shape = servegen_shape(first_day=9 + seed)
    sizes = azure_conv(limit=5000)
    return diurnal(shape, window_s=minutes * 60 / len(shape), mean_rate=50.0, sizes=sizes, seed=3 + 10 * seed)


class _Maker:
    """Requests with unique segments (no prefix sharing, as the Azure trace), ids from one counter."""

    def __init__(self, tag: str, seed: int) -> None:
        self.tag = tag
        self.out: list[RequestSpec] = []
        self.next_segment = (1 << 61) | (seed << 40)

    def add(self, t: float, prompt: int, out: int) -> None:
        n = math.ceil(prompt / SEGMENT_TOKENS)
        self.out.append(RequestSpec(f"{self.tag}-{len(self.out)}", t, prompt, max(1, out),
                                    list(range(self.next_segment, self.next_segment + n))))
        self.next_segment += n


def zipf_tokens(rng: random.Random, a: float, lo: int, hi: int) -> int:
    """A size with P(n) ∝ n^-a on [lo, hi] (continuous inverse CDF, rounded)."""
    e = 1 - a
    u = rng.random()
    return round((lo**e + u * (hi**e - lo**e)) ** (1 / e))


def burstgpt(minutes: float, seed: int = DEV_SEED) -> list[RequestSpec]:
    rng = random.Random(1000 + seed)
    outs = [s.max_tokens for s in azure_conv(limit=5000)]
    m = _Maker(f"bg{seed}", seed)
    span, seg = minutes * 60, 120.0
    t = 0.0
    for start in range(0, math.ceil(span / seg)):
        end = min(span, (start + 1) * seg)
        shape = rng.uniform(0.25, 1.0)
        rate = 22.0 * math.exp(rng.gauss(0, 0.25)) * (rng.uniform(2.5, 3.5) if rng.random() < 0.125 else 1.0)
        t = max(t, start * seg)
        while True:
            t += rng.gammavariate(shape, 1 / (shape * rate))
            if t >= end:
                break
            m.add(t, zipf_tokens(rng, 1.1, 32, 8192), outs[rng.randrange(len(outs))])
    return m.out


def ramp(minutes: float, seed: int = DEV_SEED) -> list[RequestSpec]:
    rng = random.Random(2000 + seed)
    sizes = azure_conv(limit=5000)
    m = _Maker(f"rp{seed}", seed)
    span, lo, hi = minutes * 60, 8.0, 55.0
    t = 0.0
    while True:
        # Thinning: candidates at the top rate, each kept with the ramp's rate at its time over it.
        t += rng.expovariate(hi)
        if t >= span:
            break
        if rng.random() < (lo + (hi - lo) * t / span) / hi:
            s = sizes[rng.randrange(len(sizes))]
            m.add(t, s.prompt_tokens, s.max_tokens)
    return m.out


def pd(minutes: float, seed: int = DEV_SEED) -> list[RequestSpec]:
    rng = random.Random(3000 + seed)
    m = _Maker(f"pd{seed}", seed)
    span, rate, fade = minutes * 60, 14.0, 120.0
    phase = span / 4
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= span:
            break
        k = int(t // phase)
        into = t - k * phase
        long_prompt = k % 2 == 0
        if k > 0 and into < fade and rng.random() > into / fade:
            long_prompt = not long_prompt          # still the previous phase's kind, fading out
        if long_prompt:
            m.add(t, rng.randint(3000, 6000), rng.randint(8, 48))
        else:
            m.add(t, rng.randint(100, 400), rng.randint(400, 900))
    return m.out


WORKLOADS: dict[str, Callable[[float, int], list[RequestSpec]]] = {
    "bursty": bursty, "diurnal": daily, "burstgpt": burstgpt, "ramp": ramp, "pd": pd}
