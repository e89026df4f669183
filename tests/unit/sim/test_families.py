"""The workload family: each generator is seeded and has the reuse structure it claims."""

from __future__ import annotations

import itertools
import random
import statistics
from collections import Counter

import pytest

from kvpilot.sim.families import (
    SEGMENT,
    WORKLOADS,
    AgenticConfig,
    Arrivals,
    agentic,
    chat,
    make_workload,
    no_reuse,
    rag,
)
from kvpilot.sim.workload import RequestSpec

SYNTHETIC = [name for name in WORKLOADS if name != "mooncake"]


def _rows(specs: list[RequestSpec]) -> list[tuple[str, float, int, int, tuple[int, ...]]]:
    return [(s.request_id, round(s.arrival, 9), s.prompt_tokens, s.max_tokens, tuple(s.segments)) for s in specs]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_same_seed_same_requests_other_seed_other_requests(name: str) -> None:
    a = make_workload(name, 300, 5.0, seed=3)
    assert _rows(a) == _rows(make_workload(name, 300, 5.0, seed=3))
    assert _rows(a) != _rows(make_workload(name, 300, 5.0, seed=4))


@pytest.mark.parametrize("name", SYNTHETIC)
def test_rate_changes_only_the_timing(name: str) -> None:
    # Enough requests for the long-run mean: agentic arrivals switch between calm and bursts.
    slow, fast = make_workload(name, 2000, 2.0, seed=1), make_workload(name, 2000, 8.0, seed=1)
    a, b = ({s.request_id: s for s in specs} for specs in (slow, fast))
    both = a.keys() & b.keys()
    # One stream of sessions per seed: a session has the same content at any rate (which ones
    # are under way at t = 0 depends on the rate).
    assert len(both) > 200
    assert all(a[r].segments == b[r].segments and a[r].max_tokens == b[r].max_tokens for r in both)
    for specs, rate in ((slow, 2.0), (fast, 8.0)):
        assert len(specs) == 2000 and specs[0].arrival >= 0
        assert all(y.arrival >= x.arrival for x, y in itertools.pairwise(specs))
        assert all(s.prompt_tokens == len(s.segments) * SEGMENT for s in specs)
        # Steady state: the rate holds over the whole run, no ramp of first or last turns.
        half = specs[len(specs) // 2].arrival
        assert rate * 0.6 < len(specs) / specs[-1].arrival < rate * 1.5
        assert 0.5 < half / (specs[-1].arrival - half) < 2.0   # agentic: MMPP bursts


def _prefix_of(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def test_agentic_tenants_zipf_long_system_prompts_growing_sessions() -> None:
    specs = agentic(3000, 20.0, seed=2)
    by_tenant: dict[str, list[RequestSpec]] = {}
    for s in specs:
        by_tenant.setdefault(s.tenant, []).append(s)
    shares = sorted((len(v) / len(specs) for v in by_tenant.values()), reverse=True)
    assert shares[0] > 0.12 and shares[0] > 3 * shares[9]     # a few hot tenants, a long tail
    for reqs in by_tenant.values():
        # Every request of a tenant starts with the tenant's system prompt: the longest common
        # prefix of all of them, 1k-12k tokens (the first task segment never repeats).
        common = reqs[0].segments
        for s in reqs[1:]:
            n = 0
            while n < min(len(common), len(s.segments)) and common[n] == s.segments[n]:
                n += 1
            common = common[:n]
        if len(reqs) > 1 and len({s.request_id.rsplit("-", 1)[0] for s in reqs}) > 1:
            assert 1024 <= len(common) * SEGMENT <= 12288 + SEGMENT
    sessions: dict[str, list[RequestSpec]] = {}
    for s in specs:
        sessions.setdefault(s.request_id.rsplit("-", 1)[0], []).append(s)
    grown = 0
    for turns in sessions.values():
        turns.sort(key=lambda s: int(s.request_id.rsplit("-", 1)[1]))
        for a, b in itertools.pairwise(turns):
            assert _prefix_of(a.segments, b.segments) and len(b.segments) > len(a.segments)
            assert b.arrival >= a.arrival
            grown += 1
    assert grown > len(specs) // 2
    assert statistics.median(s.max_tokens for s in specs) < 120  # short outputs: tool calls


def test_agentic_zipf_exponent_sets_the_skew() -> None:
    def top_share(z: float) -> float:
        specs = agentic(2000, 10.0, seed=5, cfg=AgenticConfig(zipf=z))
        return max(Counter(s.tenant for s in specs).values()) / len(specs)
    assert top_share(0.3) < top_share(1.1) < top_share(2.0)


def test_mmpp_bursts_are_burstier_than_poisson() -> None:
    def dispersion(arr: Arrivals) -> float:
        starts = arr.starts(20000, 10.0, random.Random(0))
        counts = Counter(int(t // 10) for t in starts)
        values = [counts.get(w, 0) for w in range(int(starts[-1] // 10))]
        return statistics.pvariance(values) / statistics.mean(values)
    poisson = dispersion(Arrivals())
    assert 0.7 < poisson < 1.3
    assert dispersion(Arrivals(burst_factor=5.0, burst_share=0.2, burst_s=20.0)) > 3 * poisson
    starts = Arrivals(burst_factor=5.0).starts(20000, 10.0, random.Random(1))
    assert 8.0 < len(starts) / starts[-1] < 12.0   # the mean rate is kept


def test_chat_global_system_prompt_and_per_user_history() -> None:
    specs = chat(1500, 10.0, seed=0)
    heads = Counter(tuple(s.segments[:4]) for s in specs)
    assert len(heads) == 1                        # one system prompt shared by all
    users: dict[str, list[RequestSpec]] = {}
    for s in specs:
        users.setdefault(s.request_id.rsplit("-", 1)[0], []).append(s)
    assert len(users) > 200
    multi = [t for t in users.values() if len(t) > 1]
    assert len(multi) > len(users) // 3
    for turns in multi:
        turns.sort(key=lambda s: int(s.request_id.rsplit("-", 1)[1]))
        for a, b in itertools.pairwise(turns):
            assert _prefix_of(a.segments, b.segments)
    # Users never share anything past the system prompt.
    firsts = Counter(t[0].segments[4 + 0] for t in users.values() if len(t[0].segments) > 4)
    assert max(firsts.values()) == 1
    outs = [s.max_tokens for s in specs]
    assert 150 < statistics.median(outs) < 400


def test_rag_reuses_chunks_mostly_away_from_the_prefix() -> None:
    specs = rag(2000, 10.0, seed=0)
    chunk = 512 // SEGMENT
    seen_at: dict[int, set[int]] = {}
    lead_reuse = other_reuse = 0
    for s in specs:
        body = s.segments[128 // SEGMENT:]
        chunks = [body[i] for i in range(0, len(body) - chunk, chunk)]
        for pos, c in enumerate(chunks):
            if c in seen_at:
                if pos == 0 and 0 in seen_at[c]:
                    lead_reuse += 1
                else:
                    other_reuse += 1
            seen_at.setdefault(c, set()).add(pos)
    assert lead_reuse > 0
    assert other_reuse > 3 * lead_reuse       # most reuse is not at the head of the prompt


def test_no_reuse_shares_nothing_with_azure_code_sizes() -> None:
    specs = no_reuse(3000, 10.0, seed=0)
    segs = [seg for s in specs for seg in s.segments]
    assert len(segs) == len(set(segs))
    assert 1000 < statistics.median(s.prompt_tokens for s in specs) < 2200
    assert statistics.median(s.max_tokens for s in specs) < 30


def test_mooncake_slices_by_seed_at_the_given_rate() -> None:
    a = make_workload("mooncake", 500, 6.0, seed=0)
    b = make_workload("mooncake", 500, 6.0, seed=1)
    assert a[0].arrival == 0.0 and len(a) == len(b) == 500
    assert a[0].request_id != b[0].request_id
    assert (len(a) - 1) / a[-1].arrival == pytest.approx(6.0)
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope", 10, 1.0)
