"""The workload family: seeded generators, each standing for a kind of real traffic.

Routing that was tuned on one trace can fail on the next customer's; these generators give the
benchmarks (`bench/routing_quality.py`, `kvpilot sim cluster --workload NAME`, the live replays)
traffic of different reuse shapes, at any rate, from a seed:

- `mooncake`: Kimi's chat service (the Mooncake conversation trace, real); reuse: history
  prefixes.
- `agentic`: a multi-tenant agent platform; each tenant's agent carries 1k-12k tokens of tool
  definitions, Zipf-popular tenants, sessions that append tool calls and results turn by turn,
  short outputs, bursty (MMPP) arrivals; reuse: a few hot, long tenant prefixes + per-session growth.
- `chat`: a consumer chat product; one global system prompt, per-user conversations,
  ShareGPT-like turn lengths; reuse: per-user history prefixes.
- `rag`: retrieval-augmented QA over a shared corpus, chunks in relevance order; reuse: chunks
  shared at varying positions (only a leading chunk is prefix reuse).
- `no-reuse`: code completion with the Azure LLM inference trace 2023 (*code*) sizes: long
  prompts, very short outputs; no reuse.

Every generator draws the *content* of its sessions (tenants, lengths, turns) from one seeded
stream and the *arrival times* from another, so the same seed at another `rate` has the same
sessions and the same requests, only closer together: more users at once, each at their own
pace. Prompts are lists of 64-token segments (`SEGMENT`): an equal segment prefix is a shared
prompt prefix, both in virtual time (hashed ids) and live (rendered text).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvpilot.sim.workload import RequestSpec, mooncake

SEGMENT = 64          # tokens per segment: divides the engines' block sizes used here (16, 64)


class _Segments:
    """Fresh, never-reused segment ids in a range of their own per workload and seed."""

    def __init__(self, tag: int, seed: int) -> None:
        self.next = (tag << 56) | (seed << 36)

    def take(self, tokens: int) -> list[int]:
        n = max(1, math.ceil(tokens / SEGMENT))
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def zipf_weights(n: int, exponent: float) -> list[float]:
    """Popularity of rank k (1-based) ∝ 1 / k^exponent, normalised."""
    w = [1.0 / (k + 1) ** exponent for k in range(n)]
    total = sum(w)
    return [x / total for x in w]


@dataclass(slots=True)
class Turn:
    """One request of a session: the prompt grows by `add` (segments) before it, the
    response's `output` tokens come back, and the next turn follows `gap` seconds later."""

    add: list[int]
    output: int
    gap: float
    tenant: str = ""


Session = list[Turn]


@dataclass(slots=True)
class Arrivals:
    """Session starts: a Markov-modulated Poisson process (MMPP) with a calm and a burst state.
    `burst_factor` 1 is plain Poisson. Rates are normalised so the long-run mean is `rate`."""

    burst_factor: float = 1.0       # burst-state rate / calm-state rate
    burst_share: float = 0.2        # long-run share of time in the burst state
    burst_s: float = 20.0           # mean length of a burst (exponential)

    def times(self, rate: float, rng: random.Random) -> Iterator[float]:
        """Start times from 0 on, at a long-run mean of `rate` per second, without end."""
        calm_s = self.burst_s * (1 - self.burst_share) / max(self.burst_share, 1e-9)
        # Mean rate = rate: calm λ·(1 − s) + burst λ·f·s.
        calm = rate / ((1 - self.burst_share) + self.burst_factor * self.burst_share)
        t = 0.0
        bursting = False
        switch = rng.expovariate(1 / calm_s) if self.burst_factor != 1.0 else math.inf
        while True:
            nxt = t + rng.expovariate(calm * (self.burst_factor if bursting else 1.0))
            if nxt >= switch:   # memoryless: restart the draw in the new state
                t = switch
                bursting = not bursting
                switch = t + rng.expovariate(1 / (self.burst_s if bursting else calm_s))
                continue
            t = nxt
            yield t

    def starts(self, n: int, rate: float, rng: random.Random) -> list[float]:
        return list(itertools.islice(self.times(rate, rng), n))


def realise(next_session: Callable[[], Session], arrivals: Arrivals, requests: int, rate: float, seed: int,
            prefix: str, tag: int) -> list[RequestSpec]:
    """`requests` requests at `rate` per second from a stream of sessions, in steady state.

    Sessions start by `arrivals` (at rate / mean turns per session); each turn's prompt is the
    session's history so far plus its `add`, and the response becomes part of the history. The
    stream starts before t = 0 by the 95th-percentile session's duration, and the first `requests`
    requests from t = 0 are kept: no ramp-up with only first turns, no tail of last turns only.
    The sessions are the same at every rate (one content stream per seed); which of them are
    under way at t = 0 depends on the rate."""
    pending: deque[Session] = deque(next_session() for _ in range(200))
    mean_turns = sum(len(x) for x in pending) / len(pending)
    lengths = sorted(sum(t.gap for t in x[:-1]) for x in pending)
    pre = min(600.0, lengths[int(0.95 * len(lengths))])   # the few longer ones start part-way
    times = arrivals.times(rate / mean_turns, random.Random(seed * 7919 + 17))
    reply = _Segments(tag | 0x80, seed)   # responses: ids of their own
    out: list[RequestSpec] = []
    at: list[float] = []   # arrival times so far, sorted
    sid = 0
    while True:
        session = pending.popleft() if pending else next_session()
        t = next(times) - pre
        # Sessions start in order: requests before t are all known now.
        if t > 0 and bisect.bisect_right(at, t) >= requests:
            break
        history: list[int] = []
        for k, turn in enumerate(session):
            history = history + turn.add
            if t >= 0:
                out.append(RequestSpec(f"{prefix}-{sid}-{k}", t, len(history) * SEGMENT, turn.output, history,
                                       SEGMENT, turn.tenant))
                bisect.insort(at, t)
            history = history + reply.take(turn.output)
            t += turn.gap
        sid += 1
    out.sort(key=lambda s: (s.arrival, s.request_id))
    return out[:requests]


@dataclass(slots=True)
class AgenticConfig:
    """Tenants' agents on one shared fleet (a multi-tenant agent platform)."""

    tenants: int = 40
    zipf: float = 1.1                          # popularity exponent over tenants
    system_tokens: tuple[int, int] = (1024, 12288)   # tool definitions + instructions, log-uniform
    task_tokens: tuple[int, int] = (100, 1000)
    turns_mean: float = 6.0                    # geometric, at least 1
    turns_max: int = 30
    tool_result_median: int = 400              # each turn appends the last tool call's result
    output_median: int = 60                    # tool calls and short answers
    gap_s: float = 2.0                         # mean tool execution time between turns
    arrivals: Arrivals = field(default_factory=lambda: Arrivals(burst_factor=4.0, burst_share=0.15,
                                                                burst_s=15.0))


def agentic(requests: int, rate: float, seed: int = 0, cfg: AgenticConfig | None = None) -> list[RequestSpec]:
    cfg = cfg or AgenticConfig()
    rng = random.Random(seed)
    seg = _Segments(0x21, seed)
    lo, hi = cfg.system_tokens
    systems = [seg.take(int(math.exp(rng.uniform(math.log(lo), math.log(hi))))) for _ in range(cfg.tenants)]
    weights = zipf_weights(cfg.tenants, cfg.zipf)
    order = list(range(cfg.tenants))
    rng.shuffle(order)   # popularity independent of prompt length

    def session() -> Session:
        tenant = order[rng.choices(range(cfg.tenants), weights)[0]]
        n = min(cfg.turns_max, 1 + int(rng.expovariate(1 / max(cfg.turns_mean - 1, 1e-9))))
        turns = [Turn(systems[tenant] + seg.take(rng.randint(*cfg.task_tokens)),
                      _lognormal(rng, cfg.output_median, 0.8, 8, 512), rng.expovariate(1 / cfg.gap_s),
                      f"tenant-{tenant}")]
        for _ in range(n - 1):
            turns.append(Turn(seg.take(_lognormal(rng, cfg.tool_result_median, 1.0, 32, 4000)),
                              _lognormal(rng, cfg.output_median, 0.8, 8, 512), rng.expovariate(1 / cfg.gap_s),
                              f"tenant-{tenant}"))
        return turns
    return realise(session, cfg.arrivals, requests, rate, seed, "ag", 0x21)


@dataclass(slots=True)
class ChatConfig:
    """A chat product: a global system prompt, then each user's own conversation. Turn lengths
    follow ShareGPT's shape (user turns: median ≈ 70 tokens, long tail; answers: median ≈ 250)."""

    system_tokens: int = 256
    user_median: int = 70
    user_sigma: float = 1.2
    output_median: int = 250
    output_sigma: float = 0.8
    turns_mean: float = 4.0                     # ShareGPT: ≈ 3.5 user turns per conversation
    turns_max: int = 24
    think_s: float = 20.0                       # mean gap between a user's turns
    arrivals: Arrivals = field(default_factory=Arrivals)


def chat(requests: int, rate: float, seed: int = 0, cfg: ChatConfig | None = None) -> list[RequestSpec]:
    cfg = cfg or ChatConfig()
    rng = random.Random(seed)
    seg = _Segments(0x22, seed)
    system = seg.take(cfg.system_tokens)

    def session() -> Session:
        n = min(cfg.turns_max, 1 + int(rng.expovariate(1 / max(cfg.turns_mean - 1, 1e-9))))
        turns = []
        for k in range(n):
            add = seg.take(_lognormal(rng, cfg.user_median, cfg.user_sigma, 4, 4000))
            turns.append(Turn((system + add) if k == 0 else add,
                              _lognormal(rng, cfg.output_median, cfg.output_sigma, 8, 2048),
                              rng.expovariate(1 / cfg.think_s)))
        return turns
    return realise(session, cfg.arrivals, requests, rate, seed, "ch", 0x22)


@dataclass(slots=True)
class RagConfig:
    """Retrieval-augmented QA: a short instruction, `k` retrieved chunks of a shared corpus in
    relevance order (chunk popularity is Zipf), the question. Two requests share a prompt prefix
    only as far as their chunk lists agree from the first; a chunk shared at another position is
    reuse a prefix cache cannot use."""

    corpus_chunks: int = 4000
    chunk_tokens: int = 512
    zipf: float = 0.9
    chunks: tuple[int, int] = (3, 8)
    system_tokens: int = 128
    question_median: int = 40
    output_median: int = 150
    arrivals: Arrivals = field(default_factory=Arrivals)


def rag(requests: int, rate: float, seed: int = 0, cfg: RagConfig | None = None) -> list[RequestSpec]:
    cfg = cfg or RagConfig()
    rng = random.Random(seed)
    seg = _Segments(0x23, seed)
    system = seg.take(cfg.system_tokens)
    corpus = [seg.take(cfg.chunk_tokens) for _ in range(cfg.corpus_chunks)]
    weights = zipf_weights(cfg.corpus_chunks, cfg.zipf)
    cum = list(_accumulate(weights))

    def session() -> Session:
        k = rng.randint(*cfg.chunks)
        picked: list[int] = []
        while len(picked) < k:
            c = _draw(cum, rng.random())
            if c not in picked:
                picked.append(c)
        # Relevance order is by the query, not popularity: the most popular chunk is first only
        # sometimes, so reuse sits at varying positions.
        rng.shuffle(picked)
        prompt = system + [s for c in picked for s in corpus[c]] + seg.take(
            _lognormal(rng, cfg.question_median, 0.7, 4, 400))
        return [Turn(prompt, _lognormal(rng, cfg.output_median, 0.7, 8, 1024), 0.0)]
    return realise(session, cfg.arrivals, requests, rate, seed, "rag", 0x23)


@dataclass(slots=True)
class NoReuseConfig:
    """Code completion without shared context. Sizes follow the shape published for the Azure
    LLM inference trace 2023 (code): prompt median ≈ 1.5k tokens with a long tail, output median
    ≈ 13 tokens (Splitwise, ISCA 2024). The code CSV itself is not in ../shared/traces."""

    prompt_median: int = 1500
    prompt_sigma: float = 0.9
    output_median: int = 13
    output_sigma: float = 1.3
    arrivals: Arrivals = field(default_factory=Arrivals)


def no_reuse(requests: int, rate: float, seed: int = 0, cfg: NoReuseConfig | None = None) -> list[RequestSpec]:
    cfg = cfg or NoReuseConfig()
    rng = random.Random(seed)
    seg = _Segments(0x24, seed)

    def session() -> Session:
        return [Turn(seg.take(_lognormal(rng, cfg.prompt_median, cfg.prompt_sigma, 16, 16000)),
                     _lognormal(rng, cfg.output_median, cfg.output_sigma, 1, 1024), 0.0)]
    return realise(session, cfg.arrivals, requests, rate, seed, "nr", 0x24)


def _accumulate(weights: list[float]) -> list[float]:
    out, s = [], 0.0
    for w in weights:
        s += w
        out.append(s)
    return out


def _draw(cum: list[float], u: float) -> int:
    import bisect
    return min(len(cum) - 1, bisect.bisect_left(cum, u * cum[-1]))


MOONCAKE_RATE = 3.03   # req/s of the trace's first 3,000 requests at speedup 1


def _mooncake(requests: int, rate: float, seed: int = 0) -> list[RequestSpec]:
    """The real trace, time-compressed to `rate`; `seed` picks the slice (seed k: requests from k × n)."""
    specs = mooncake(limit=(seed + 1) * requests)[seed * requests:]
    t0 = specs[0].arrival
    span = specs[-1].arrival - t0
    speed = rate * span / max(1, len(specs) - 1)
    for s in specs:
        s.arrival = (s.arrival - t0) / speed
    return specs


WORKLOADS: dict[str, Callable[[int, float, int], list[RequestSpec]]] = {
    "mooncake": _mooncake, "agentic": agentic, "chat": chat, "rag": rag, "no-reuse": no_reuse,
}


def make_workload(name: str, requests: int, rate: float, seed: int = 0) -> list[RequestSpec]:
    """`requests` requests of workload `name` at a mean of `rate` requests per second."""
    try:
        gen = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None
    return gen(requests, rate, seed)
