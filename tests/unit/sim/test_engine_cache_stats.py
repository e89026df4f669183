"""The exported prefix-cache counters count each request's first lookup only, as vLLM's do."""

from __future__ import annotations

from kvpilot.sim.engine import Engine
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.sequence import Phase, Sequence
from kvpilot.tokens import block_hashes, block_text

PROFILE = get_profile("h100-llama3-8b")
BS = 16


def test_a_preempted_requests_second_lookup_is_kept_out_of_the_exported_counters() -> None:
    # 40 blocks of 16 = 640 tokens; three requests of 150 prompt + 150 output need 900: some are
    # preempted, and when scheduled again they find their own freed prompt blocks cached.
    engine = Engine(PROFILE, block_size=BS, kv_capacity_tokens=640)
    seqs = []
    for i in range(3):
        text = block_text(10 + i, 150)
        seqs.append(Sequence(f"r{i}", 0.0, 150, block_hashes(text, BS), 150))
        engine.add(seqs[-1])
    t = 0.0
    while engine.has_work:
        plan = engine.schedule(t)
        assert plan is not None
        t += plan.duration()
        engine.commit(plan, t)
    assert all(s.phase == Phase.FINISHED for s in seqs) and any(s.preemptions for s in seqs)
    c = engine.counters
    # Distinct prompts, no shared prefix: the exported counters see three misses, nothing else.
    assert c.prefix_cache_queries == 3 * 150
    assert c.prefix_cache_hits == 0
    assert c.preempted_cache_queries >= 150 and c.preempted_cache_hits > 0
