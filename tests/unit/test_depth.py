"""Adaptive key depth: expands for a hot prefix and shrinks back when it cools."""

from __future__ import annotations

from kvpilot.router.depth import AdaptiveDepth

HOT = [101, 102, 103, 104, 105, 106]


def prompt(head: list[int], tail: int) -> list[int]:
    return [*head, 900_000 + tail, 950_000 + tail]


def test_hot_prefix_expands_and_cold_one_does_not() -> None:
    ad = AdaptiveDepth(2, window=200, expand_share=0.06, shrink_share=0.02)
    keys = set()
    for i in range(200):
        if i % 2:
            key, depth = ad.key(prompt(HOT[:2], i))  # half the traffic shares a 2-block head
            keys.add(key)
        else:
            ad.key(prompt([5000 + i, 6000 + i], i))  # the other half is unique
    assert HOT[1] in ad.hot
    key, depth = ad.key(prompt(HOT[:2], 7))
    assert depth == 3 and key != HOT[1]           # the hot head's key now includes the next block
    assert len(keys) > 10                         # so its traffic has spread over many keys
    assert not any(5000 + i in ad.hot for i in range(200))


def test_expansion_shrinks_back_when_traffic_moves_away() -> None:
    ad = AdaptiveDepth(2, window=100, expand_share=0.06, shrink_share=0.02)
    for i in range(100):
        ad.key(prompt(HOT[:2], i))
    assert HOT[1] in ad.hot
    for i in range(100):
        ad.key(prompt([7000 + i, 8000 + i], i))   # the hot prefix disappears from the window
    assert HOT[1] not in ad.hot
    _, depth = ad.key(prompt(HOT[:2], 1))
    assert depth == 2


def test_depth_is_bounded_by_prompt_length_and_max_extra() -> None:
    ad = AdaptiveDepth(1, window=50, expand_share=0.01, max_extra=2)
    for i in range(200):
        _, depth = ad.key([*HOT[:3], i])
    assert depth <= 3
    short = ad.key([HOT[0]])
    assert short[1] == 1
