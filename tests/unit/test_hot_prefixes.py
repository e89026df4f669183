"""The router's view of hot prefixes and where their KV goes on a scale event (pure parts of
`kvpilot.router.handover`), the pool's membership-change hook and `AdaptiveDepth.peek`."""

from __future__ import annotations

from kvpilot.router.config import Endpoint
from kvpilot.router.depth import AdaptiveDepth
from kvpilot.router.hashring import dual_ring_owners
from kvpilot.router.hot_prefixes import (
    Hot,
    HotPrefixes,
    Move,
    Outcome,
    batches,
    combine,
    common_blocks,
    moves_in,
    moves_out,
    text_head,
)
from kvpilot.router.policies import make_policy
from kvpilot.router.pool import Member, Pool
from kvpilot.tokens import block_hashes, block_text

BS = 4  # router block size in tokens (16 bytes of text)


def observe(hp: HotPrefixes, prompt: str, depth: int = 2) -> int:
    hashes = block_hashes(prompt, BS)
    hp.observe(hashes[depth - 1], depth, hashes, prompt)
    return hashes[depth - 1]


def test_common_blocks_and_text_head() -> None:
    assert common_blocks((1, 2, 3), (1, 2, 4, 5)) == 2 and common_blocks((), (1,)) == 0
    assert text_head("abcdefgh", 1) == "abcd"
    assert text_head("é" * 4, 1) == "éé"        # 2 bytes each: 4 bytes = 2 characters
    assert text_head("aé" * 2, 1) == "aéa"       # 1 + 2 + 1 bytes
    assert text_head("aaaé", 1) == "aaa"         # the character cut in two is dropped


def test_a_prefix_is_hot_from_min_hits_and_moves_what_the_last_two_requests_shared() -> None:
    hp = HotPrefixes(BS, window=100, min_hits=2, max_blocks=8)
    head = block_text(1, 2 * BS)                 # the two key blocks
    a, b = head + block_text(2, 4 * BS), head + block_text(3, 4 * BS)
    key = observe(hp, a)
    assert hp.hot(10) == []                      # one request: not hot yet
    assert observe(hp, a) == key
    (hot,) = hp.hot(10)
    assert hot.key == key and hot.hits == 2
    assert hot.text == a and hot.hashes == tuple(block_hashes(a, BS))   # same prompt twice: all of it
    observe(hp, b)
    (hot,) = hp.hot(10)
    assert hot.hits == 3 and hot.text == head    # a and b share only the key blocks
    assert hot.hashes == tuple(block_hashes(head, BS))


def test_a_single_request_moves_only_its_key_blocks_and_long_heads_are_capped() -> None:
    hp = HotPrefixes(BS, window=100, min_hits=1, max_blocks=3)
    prompt = block_text(7, 10 * BS)
    observe(hp, prompt, depth=2)
    (hot,) = hp.hot(10)
    assert hot.text == prompt[: 2 * BS * 4] and len(hot.hashes) == 2
    observe(hp, prompt, depth=2)
    (hot,) = hp.hot(10)
    assert hot.text == prompt[: 3 * BS * 4]      # the whole prompt repeats, but only max_blocks are kept


def test_the_window_forgets_old_requests_and_hot_is_ordered_and_limited() -> None:
    hp = HotPrefixes(BS, window=6, min_hits=2)
    prompts = [block_text(i, 3 * BS) for i in range(3)]
    keys = [observe(hp, p) for p in prompts[:1] * 3 + prompts[1:2] * 2 + prompts[2:3]]
    assert [h.key for h in hp.hot(10)] == [keys[0], keys[3]]    # hottest first; one hit is not hot
    assert [h.key for h in hp.hot(1)] == [keys[0]]
    for _ in range(6):                                          # push everything out of the window
        observe(hp, prompts[2])
    assert [h.key for h in hp.hot(10)] == [keys[5]]
    assert len(hp._samples) == 1                                # forgotten keys free their prompts


def test_short_prompts_keyed_by_request_id_are_not_tracked() -> None:
    hp = HotPrefixes(BS, min_hits=1)
    hp.observe(123, 0, [], "short")
    hp.observe(123, 3, [1, 2], "too short for depth 3")
    assert hp.hot(10) == []


def hot(key: int, hits: int = 5) -> Hot:
    return Hot(key, hits, (key,), f"text-{key}")


def test_moves_in_sends_each_prefix_of_the_leaving_pod_to_its_new_owners() -> None:
    owners = dual_ring_owners()
    members = frozenset({"a", "b", "c", "d"})
    prefixes = [hot(k, hits=k % 7) for k in range(1, 400, 7)]
    plan = moves_in(prefixes, "a", members - {"a"}, owners)   # `a` already gone from the list: same plan
    assert plan == moves_in(prefixes, "a", members, owners)
    moved = {h.key for hs in plan.values() for h in hs}
    assert moved == {h.key for h in prefixes if "a" in owners(h.key, members)}
    for pod, hs in plan.items():
        assert pod != "a"
        for h in hs:
            assert pod in owners(h.key, members - {"a"}) and pod not in owners(h.key, members)
        assert [h.hits for h in hs] == sorted((h.hits for h in hs), reverse=True)


def test_moves_out_exports_from_the_owner_that_holds_the_prefix() -> None:
    owners = dual_ring_owners()
    members = frozenset({"a", "b", "c"})
    after = members | {"new"}
    prefixes = [hot(k) for k in range(1, 300, 3)]
    gained = [h for h in prefixes if "new" in owners(h.key, after) and "new" not in owners(h.key, members)]
    assert gained
    # The router believes only each key's *second* candidate holds it: that one must export.
    second = {h.key: owners(h.key, members)[1] for h in prefixes}
    plan = moves_out(prefixes, "new", after, owners, lambda pod, h: 3 if second[h.key] == pod else 0)
    assert sorted(h.key for hs in plan.values() for h in hs) == sorted(h.key for h in gained)
    assert all(second[h.key] == pod for pod, hs in plan.items() for h in hs)
    # Nobody believed to hold anything: the first ring owner exports (ring order breaks ties).
    plan = moves_out(prefixes, "new", after, owners, lambda pod, h: 0)
    assert all(owners(h.key, members)[0] == pod for pod, hs in plan.items() for h in hs)


def test_pool_reports_who_joined_and_who_left() -> None:
    def ep(name: str) -> Endpoint:
        return Endpoint(name=name, url=f"http://127.0.0.1:9000/{name}")  # type: ignore[arg-type]

    pool = Pool([ep("a"), ep("b")], make_policy("round-robin"))
    seen: list[tuple[list[str], list[str]]] = []

    def changed(joined: list[Member], left: list[Member]) -> None:
        seen.append(([m.endpoint.name for m in joined], [m.endpoint.name for m in left]))

    pool.on_change = changed
    pool.set_endpoints([ep("b"), ep("a")])
    assert seen == []                                  # same members: no event
    old_b = pool.by_name["b"]
    pool.set_endpoints([ep("a"), ep("c")])
    assert seen == [(["c"], ["b"])]
    assert old_b.url.endswith("/b")                    # the leaving member still carries its URL


def test_peek_gives_the_key_without_counting() -> None:
    depth = AdaptiveDepth(2, window=10, expand_share=0.1, shrink_share=0.05)
    hashes = [11, 22, 33, 44]
    assert depth.peek(hashes) == (22, 2)
    for _ in range(2):
        assert depth.key(hashes) == (22, 2)
    assert 22 in depth.hot and depth.peek(hashes) == (33, 3)     # now hot: a longer key
    counts = dict(depth._recent.counts)
    depth.peek(hashes)
    assert dict(depth._recent.counts) == counts


def test_batches_move_the_hottest_prefixes_first_and_keep_a_prefixes_moves_together() -> None:
    a, b, c = hot(1, hits=2), hot(2, hits=9), hot(3, hits=5)
    moves = [Move("x", "p", a), Move("x", "p", b), Move("x", "q", b), Move("x", "q", c)]
    assert batches(moves, 2) == [[Move("x", "p", b), Move("x", "q", b), Move("x", "q", c)], [Move("x", "p", a)]]
    assert batches(moves, 5) == [moves] and batches([], 3) == []


def test_combine_fails_only_when_nothing_arrived() -> None:
    ok, failed, noop = Outcome("ok", 2, 100), Outcome("failed", detail="store down"), Outcome("noop")
    assert combine([ok, ok]).outcome == "ok" and combine([ok, ok]).prefixes == 4
    assert combine([ok, noop]).outcome == "ok"
    out = combine([ok, failed])
    assert (out.outcome, out.prefixes, out.bytes, out.detail) == ("partial", 2, 100, "store down")
    assert combine([failed]).outcome == "failed" and combine([noop]).outcome == "noop"
    assert combine([Outcome("unsupported")]).outcome == "unsupported" and combine([]).outcome == "noop"


def test_a_pod_replaced_in_one_change_hands_its_keys_to_the_replacement() -> None:
    owners = dual_ring_owners()
    prefixes = [hot(k) for k in range(1, 200, 5)]
    # Seen as one change, "y" joining while "x" leaves is the only pod after: it inherits every key.
    plan = moves_in(prefixes, "x", frozenset({"x"}), owners, after=frozenset({"y"}))
    assert sorted(h.key for h in plan["y"]) == sorted(h.key for h in prefixes) and list(plan) == ["y"]
    # Planned as if "y" had been there before, nothing would move (it looks like an owner already).
    assert moves_in(prefixes, "x", frozenset({"x", "y"}), owners) == {}


def test_with_held_a_remaining_owner_that_never_served_the_prefix_gets_it() -> None:
    owners = dual_ring_owners()
    prefixes = [hot(k) for k in range(1, 200, 5)]
    pair = frozenset({"x", "y"})
    assert moves_in(prefixes, "x", pair, owners) == {}     # "y" is every key's other candidate
    # The router believes "y" holds only the first three prefixes: it gets the rest.
    holds = {h.key for h in prefixes[:3]}
    plan = moves_in(prefixes, "x", pair, owners, held=lambda pod, h: len(h.hashes) if h.key in holds else 0)
    assert sorted(h.key for h in plan["y"]) == sorted(h.key for h in prefixes[3:]) and list(plan) == ["y"]
    # In a bigger pool only keys "x" owned move, and a new owner gets them whatever it holds.
    members = frozenset({"x", "y", "z", "w"})
    plain = moves_in(prefixes, "x", members, owners)
    full = moves_in(prefixes, "x", members, owners, held=lambda pod, h: 0)
    for pod, hs in plain.items():
        assert {h.key for h in hs} <= {h.key for h in full[pod]}
    for pod, hs in full.items():
        assert all("x" in owners(h.key, members) and pod in owners(h.key, members - {"x"}) for h in hs)


def eager_hot(requests: list[tuple[int, int, list[int], str]], window: int, min_hits: int,
              max_blocks: int, limit: int = 50) -> list[Hot]:
    """The reference: every request's head text kept, the window counted from scratch."""
    recent = requests[-window:]
    counts: dict[int, int] = {}
    for key, _, _, _ in recent:
        counts[key] = counts.get(key, 0) + 1
    out = []
    for key, hits in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]:
        if hits < min_hits:
            break
        mine = [(i, d, tuple(h[:max_blocks]), p) for i, (k, d, h, p) in enumerate(requests) if k == key]
        at, depth, head, prompt = mine[-1]
        common = min(depth, len(head))
        if len(mine) > 1 and mine[-2][0] >= at - window:   # the key's previous request was still in the window
            common = max(common, common_blocks(mine[-2][2], head))
        out.append(Hot(key, hits, head[:common], text_head(prompt, common * BS)))
    return out


def test_text_kept_from_an_earlier_request_moves_the_same_prefix_as_the_latest_ones() -> None:
    """Text is copied only when `hot` could need it; what `hot` reports is what keeping every
    request's text would report (random traffic over a few shared heads and tails)."""
    import random

    rng = random.Random(5)
    for min_hits, max_blocks in ((1, 3), (2, 8), (3, 32)):
        hp = HotPrefixes(BS, window=40, min_hits=min_hits, max_blocks=max_blocks)
        seen: list[tuple[int, int, list[int], str]] = []
        for _ in range(400):
            head = block_text(rng.randrange(6), 2 * BS)
            tail = "".join(block_text(1000 + rng.randrange(4), BS) for _ in range(rng.randrange(0, 9)))
            prompt = head + tail + "x" * rng.randrange(3 * BS * 4)
            hashes = block_hashes(prompt, BS)
            depth = rng.choice([1, 2, 2, 3]) if len(hashes) >= 3 else 2
            hp.observe(hashes[depth - 1], depth, hashes, prompt)
            seen.append((hashes[depth - 1], depth, hashes, prompt))
            assert hp.hot(50) == eager_hot(seen, 40, min_hits, max_blocks)


def test_a_key_seen_once_keeps_no_text_until_it_can_be_hot() -> None:
    hp = HotPrefixes(BS, window=100, min_hits=2, max_blocks=8)
    a = block_text(1, 2 * BS) + block_text(2, 4 * BS)
    key = observe(hp, a)
    assert hp._samples[key].text == ""        # one request: `hot` cannot report it, nothing copied
    observe(hp, a)
    assert hp._samples[key].text == a          # now it can: the head is copied
