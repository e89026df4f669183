"""Live migration's copy schedule: which blocks each round copies and when to stop."""

from __future__ import annotations

import pytest

from kvpilot.kvtransfer.migration import CopyTuning, Step, block_bytes, blocks_to_copy, next_step


def test_rounds_copy_every_block_once_and_the_partial_tail_again_as_it_fills() -> None:
    assert list(blocks_to_copy(0, 40, 16)) == [0, 1, 2]          # round 0: all, the tail half full
    assert list(blocks_to_copy(40, 52, 16)) == [2, 3]            # the tail again, then a new block
    assert list(blocks_to_copy(48, 48, 16)) == []                # nothing new
    assert list(blocks_to_copy(48, 49, 16)) == [3]
    assert [block_bytes(i, 40, 16, 10) for i in range(3)] == [160, 160, 80]
    # Replaying rounds leaves every token covered by the last copy of its block.
    copied, latest = 0, {}
    for kv in (1000, 1013, 1015, 1016, 1017):
        for i in blocks_to_copy(copied, kv, 16):
            latest[i] = block_bytes(i, kv, 16, 1)
        copied = kv
    assert sum(latest.values()) == 1017 and sorted(latest) == list(range(64))


def test_stop_when_the_delta_is_small_or_the_rounds_are_spent() -> None:
    tuning = CopyTuning(block_tokens=16, stop_delta_tokens=32, max_rounds=3)
    assert next_step(1, 500, tuning) is Step.COPY
    assert next_step(2, 32, tuning) is Step.STOP
    assert next_step(3, 500, tuning) is Step.STOP          # the request outpaces the copy: stop anyway
    with pytest.raises(ValueError):
        CopyTuning(block_tokens=0)
