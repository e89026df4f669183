"""Adaptive key depth: expands for a hot prefix and shrinks back when it cools."""

from __future__ import annotations

from kvpilot.router.depth import AdaptiveDepth, SplitDepth, common_depth

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


def tenant_prompt(tenant: int, session: int, turns: int = 1) -> list[int]:
    """A 40-block tool prompt per tenant, then the session's own blocks (chained: each hash
    stands for its whole prefix, as in a real prompt)."""
    out, h = [], tenant
    for i in range(40):
        h = hash((h, "sys", i))
        out.append(h)
    for i in range(2 + turns):
        h = hash((h, "session", session, i))
        out.append(h)
    return out


def test_common_depth_binary_searches_chained_hashes() -> None:
    a, b = tenant_prompt(1, 1), tenant_prompt(1, 2)
    assert common_depth(a, b) == 40
    assert common_depth(a, a) == len(a)
    assert common_depth(a, tenant_prompt(2, 1)) == 0
    assert common_depth(a[:10], b) == 10


def test_split_keys_a_hot_tenant_by_session_and_keeps_a_cold_one_together() -> None:
    sd = SplitDepth(1, window=400, hot_share=0.125)
    for i in range(400):
        tenant = 1 if i % 2 else 100 + i % 40          # tenant 1 has half the traffic
        sd.key(tenant_prompt(tenant, i))
    hot = tenant_prompt(1, 0)
    assert sd.hot.get(hot[0]) == 40                   # split where its sessions diverge
    keys = {sd.peek(tenant_prompt(1, s))[0] for s in range(50)}
    assert len(keys) == 50                            # one key per session: spread over the fleet
    key, depth = sd.peek(tenant_prompt(1, 7))
    assert depth == 41
    # The same session keeps its key as its prompt grows turn by turn.
    assert all(sd.peek(tenant_prompt(1, 7, turns=t))[0] == key for t in range(1, 6))
    # A cold tenant (2.5% of traffic) keeps one key for all its sessions: one pair of instances.
    cold = {sd.peek(tenant_prompt(105, s))[0] for s in range(20)}
    assert len(cold) == 1


def test_split_cools_down_when_the_tenant_goes_quiet() -> None:
    sd = SplitDepth(1, window=200, hot_share=0.125)
    for i in range(200):
        sd.key(tenant_prompt(1, i))
    assert sd.hot
    for i in range(400):
        sd.key(tenant_prompt(500 + i, i))            # other traffic only
    assert tenant_prompt(1, 0)[0] not in sd.hot
    assert sd.peek(tenant_prompt(1, 3))[1] == 1


def test_split_key_of_a_prompt_inside_a_hot_prefix_stays_its_last_block() -> None:
    sd = SplitDepth(1, window=100, hot_share=0.1)
    for i in range(100):
        sd.key(tenant_prompt(1, i))
    short = tenant_prompt(1, 0)[:20]                  # ends inside the hot tool prompt
    assert sd.key(short) == (short[-1] & (1 << 64) - 1, 20)


def test_a_peek_before_key_changes_no_key() -> None:
    """The router peeks every prompt (hot-prefix tracking) just before keying it, and `key` reuses
    that walk; interleaved with other prompts' keys and peeks (which change `hot`), every key
    must be what a `SplitDepth` that never peeks gives."""
    import random

    rng = random.Random(3)
    plain, peeked = SplitDepth(1, window=150, hot_share=0.1), SplitDepth(1, window=150, hot_share=0.1)
    for i in range(1500):
        p = tenant_prompt(1 if rng.random() < 0.4 else rng.randrange(2, 30), rng.randrange(200),
                          turns=rng.randrange(3))
        other = tenant_prompt(rng.randrange(1, 30), rng.randrange(200))
        if rng.random() < 0.3:       # another request is keyed between this one's peek and key
            assert peeked.peek(p) == plain.peek(p)
            assert peeked.key(other) == plain.key(other)
        elif rng.random() < 0.3:     # another prompt is peeked in between
            peeked.peek(p)
            peeked.peek(other)
        else:
            assert peeked.peek(p) == plain.peek(p)
        assert peeked.key(p) == plain.key(p), i
    assert peeked.hot == plain.hot and plain.hot


def test_a_prompt_peeked_while_cold_is_keyed_past_a_prefix_that_turned_hot_since() -> None:
    sd = SplitDepth(1, window=100, hot_share=0.1, warmup=10)
    late = tenant_prompt(1, 999)
    assert sd.peek(late)[1] == 1                 # tenant 1's head is cold: keyed by its first block
    for s in range(30):                          # other sessions of tenant 1 are keyed meanwhile
        sd.key(tenant_prompt(1, s))
    assert sd.key(late)[1] == 41                 # now keyed past the hot tool prompt, not as peeked
