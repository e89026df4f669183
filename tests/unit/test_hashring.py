"""Consistent hashing properties DualMap relies on."""

from __future__ import annotations

import bisect
import random

import pytest

from kvpilot.router.hashring import FAMILIES, DualRing, HashRing

_RNG = random.Random(1)
KEYS = [_RNG.getrandbits(64) for _ in range(100_000)]


@pytest.mark.parametrize("family", ["blake2b", "sha256", "xxh64", "xxh3"])
@pytest.mark.parametrize("n", [4, 8, 16])
def test_adding_one_member_remaps_about_one_in_n_plus_one(family: str, n: int) -> None:
    names = [f"pod-{i}" for i in range(n)]
    ring = HashRing(names, family=family)
    before = [ring.lookup(k) for k in KEYS]
    ring.add("pod-new")
    after = [ring.lookup(k) for k in KEYS]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == "pod-new" for _, a in moved)  # keys only move to the newcomer
    share = len(moved) / len(KEYS)
    assert share == pytest.approx(1 / (n + 1), rel=0.25)
    ring.remove("pod-new")
    assert [ring.lookup(k) for k in KEYS[:5000]] == before[:5000]  # removal restores the old map


def test_two_routers_agree_without_shared_state() -> None:
    names = [f"pod-{i}" for i in range(32)]
    a = DualRing(names)
    shuffled = list(names)
    random.Random(3).shuffle(shuffled)
    b = DualRing()
    for name in shuffled:
        b.add(name)
    assert all(a.candidates(k) == b.candidates(k) for k in KEYS[:20_000])


def test_candidates_are_distinct_and_rings_independent() -> None:
    names = [f"pod-{i}" for i in range(8)]
    dual = DualRing(names)
    pairs = [dual.candidates(k) for k in KEYS[:20_000]]
    assert all(c1 != c2 for c1, c2 in pairs)
    # The second ring's own owner coincides with the first ring's about 1/N of the time.
    same = sum(1 for k in KEYS[:20_000] if dual.second.lookup(k) == dual.first.lookup(k)) / 20_000
    assert same == pytest.approx(1 / 8, rel=0.3)
    # Every ordered pair of distinct members shows up: the load of a hot member spreads over all others.
    assert len(set(pairs)) == 8 * 7


def test_single_member_and_empty_ring() -> None:
    assert DualRing(["only"]).candidates(42) == ("only", "only")
    with pytest.raises(LookupError):
        HashRing().lookup(1)


def test_walk_visits_each_member_once() -> None:
    ring = HashRing([f"pod-{i}" for i in range(5)], vnodes=16)
    order = list(ring.walk(123))
    assert sorted(order) == sorted(ring.members) and order[0] == ring.lookup(123)


@pytest.mark.parametrize("n", [1, 3, 200, 1000])
def test_bucketed_lookup_equals_a_plain_bisect_over_every_point(n: int) -> None:
    """The bucket table only narrows the search: owners are exactly a full bisect's, wrap included."""
    names = [f"pod-{i}" for i in range(n)]
    ring = HashRing(names, vnodes=32, family="xxh3")
    points = sorted((FAMILIES["xxh3"](f"{name}#{i}".encode()), name) for name in names for i in range(32))
    positions = [p for p, _ in points]
    keys = [*KEYS[:20_000], (1 << 64) - 1, 0]
    for k in keys:
        i = bisect.bisect_right(positions, ring.position(k))
        assert ring.lookup(k) == points[i % len(points)][1]
