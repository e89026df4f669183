"""The live-migration trigger: hot spots over θ·SLO give up their cheapest request to the coolest
instance; the SSE splicer holds back the handoff event whatever the chunking."""

from __future__ import annotations

import json

import pytest

from kvpilot.router.migration import SseSplicer
from kvpilot.router.migration_policy import Candidate, InstanceSignal, Move, Thresholds, plan_migrations, pressure

TH = Thresholds(theta=0.8, slo_tpot_s=0.1, slo_ttft_s=2.0, min_remaining_tokens=32)
BIG, SMALL, DONE = Candidate("big", 9000, 500), Candidate("small", 1200, 400), Candidate("done", 100, 5)


def test_a_tpot_hot_spot_moves_its_cheapest_worthwhile_request_to_the_coolest_instance() -> None:
    signals = [InstanceSignal("hot", 0.09, 0.0, (BIG, SMALL, DONE)),   # 90 ms > 0.8 × 100 ms
               InstanceSignal("warm", 0.05, 0.0),                      # under θ but not under θ/2
               InstanceSignal("cool", 0.02, 0.1), InstanceSignal("idle", None, 0.0)]
    # "done" has the least KV but too few tokens left to be worth a move.
    assert plan_migrations(signals, TH) == [Move("small", "hot", "idle", "tpot")]


def test_a_backlog_hot_spot_counts_too_and_nothing_moves_under_theta() -> None:
    assert plan_migrations([InstanceSignal("a", 0.01, 1.7, (SMALL,)), InstanceSignal("b", None, 0.0)], TH) == \
        [Move("small", "a", "b", "backlog")]
    calm = [InstanceSignal("a", 0.079, 1.59, (SMALL,)), InstanceSignal("b", None, 0.0)]
    assert plan_migrations(calm, TH) == []


def test_no_move_without_a_cool_target_and_at_most_max_moves_hottest_first() -> None:
    assert plan_migrations([InstanceSignal("a", 0.2, 0, (SMALL,)), InstanceSignal("b", 0.05, 0, (BIG,))], TH) == []
    signals = [InstanceSignal("a", 0.12, 0, (SMALL,)), InstanceSignal("b", 0.3, 0, (BIG,)),
               InstanceSignal("c", 0.01, 0), InstanceSignal("d", 0.0, 0)]
    assert plan_migrations(signals, TH, max_moves=1) == [Move("big", "b", "d", "tpot")]
    assert plan_migrations(signals, TH, max_moves=5) == [Move("big", "b", "d", "tpot"), Move("small", "a", "c", "tpot")]
    assert pressure(signals[1], TH) == pytest.approx(3.0)


def test_splicer_forwards_whole_events_and_holds_back_the_handoff_across_any_chunking() -> None:
    events = [b'data: {"choices":[{"text":" a"}]}\n\n', b'data: {"choices":[{"text":" b"}]}\n\n']
    handoff = {"target": "http://127.0.0.1:9", "migration_id": "x", "stream": "/kvpilot/migrations/x/stream",
               "tokens_sent": 2}
    raw = b"".join(events) + b"event: kvpilot.migrated\ndata: " + json.dumps(handoff).encode() + b"\n\n"
    for size in (1, 3, 7, len(raw)):
        splicer, out, got = SseSplicer(), b"", None
        for i in range(0, len(raw), size):
            data, h = splicer.feed(raw[i : i + size])
            out += data
            got = got or h
        assert out == b"".join(events) and got is not None and got.model_dump() == handoff
        assert splicer.flush() == b""
    plain = SseSplicer()
    assert plain.feed(b"data: [DONE]\n\ndata: par") == (b"data: [DONE]\n\n", None) and plain.flush() == b"data: par"
