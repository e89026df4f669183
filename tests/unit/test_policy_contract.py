"""The routing policy contract: completion feedback, exclusion as a filter, the P/D pair and the
declared capabilities, checked on the policies and on the proxy's pool that drives them."""

from __future__ import annotations

from collections.abc import Sequence, Set

import pytest

from kvpilot.router import hashring
from kvpilot.router.config import Endpoint, HandoverConfig
from kvpilot.router.handover import Handovers
from kvpilot.router.hashring import DualRing
from kvpilot.router.metrics import RouterMetrics
from kvpilot.router.policies import POLICIES, make_policy
from kvpilot.router.policies.least_loaded import LeastLoaded
from kvpilot.router.policy import (
    NOTHING,
    Decision,
    DecodeSide,
    InstanceLoad,
    Outcome,
    PolicyContext,
    RequestView,
)
from kvpilot.router.pool import Attempt, Pool
from kvpilot.tokens import block_hashes, block_text

CTX = PolicyContext(slo_ttft_s=60.0, block_size=256)


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(name=f"w{i}", url=f"http://127.0.0.1:{9000 + i}") for i in range(n)]  # type: ignore[arg-type]


def req(rid: str, text_id: int = 7, tokens: int = 4096) -> RequestView:
    return RequestView(rid, tokens, block_hashes(block_text(text_id, tokens), 256))


# -- completion feedback --------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["failed", "rejected", "cancelled"])
def test_cache_aware_forgets_a_prompt_whose_dispatch_never_prefilled(status: str) -> None:
    policy = make_policy("cache-aware", CTX)
    loads = [InstanceLoad(f"w{i}") for i in range(4)]
    first = req("a")
    d = policy.route(first, loads)
    policy.on_dispatch(first, d.index, loads)
    policy.on_first_token("a", None)          # what the proxy reports for a failed attempt
    policy.on_complete(first, Outcome(loads[d.index].name, status, prefilled=False))  # type: ignore[arg-type]
    again = policy.route(req("b"), loads)
    assert again.reason != "cache-hit", "a failed dispatch's prompt must not count as cached"


def test_cache_aware_keeps_a_prompt_once_any_dispatch_of_it_prefilled() -> None:
    policy = make_policy("cache-aware", CTX)
    loads = [InstanceLoad("w0")]
    a, b = req("a"), req("b")
    policy.on_dispatch(a, 0, loads)    # a adds the blocks tentatively
    policy.on_dispatch(b, 0, loads)    # b relies on them while a is in flight
    policy.on_first_token("b", 0.2)    # b's first token: the instance really has them
    policy.on_complete(b, Outcome("w0", "ok", True))
    policy.on_complete(a, Outcome("w0", "failed", False))
    assert policy.route(req("c"), [*loads, InstanceLoad("w1")]).reason == "cache-hit"


def test_cache_aware_forgets_only_when_every_relying_dispatch_failed() -> None:
    policy = make_policy("cache-aware", CTX)
    loads = [InstanceLoad("w0"), InstanceLoad("w1")]
    a, b = req("a"), req("b")
    policy.on_dispatch(a, 0, loads)
    policy.on_dispatch(b, 0, loads)
    policy.on_complete(a, Outcome("w0", "failed", False))
    assert policy.route(req("c"), loads).reason == "cache-hit", "b may still prefill them"
    policy.on_complete(b, Outcome("w0", "failed", False))
    assert policy.route(req("d"), loads).reason != "cache-hit"


@pytest.mark.parametrize("name", ["dualmap", "min-ttft"])
def test_estimating_policies_take_back_a_failed_prompt(name: str) -> None:
    policy = make_policy(name, CTX)
    loads = [InstanceLoad(f"w{i}") for i in range(4)]
    estimate = policy.cache_estimate()
    assert estimate is not None
    ok, bad = req("ok", text_id=1), req("bad", text_id=2)
    for r in (ok, bad):
        i = policy.route(r, loads).index
        policy.on_dispatch(r, i, loads)
        policy.on_first_token(r.request_id, None)
        policy.on_complete(r, Outcome(loads[i].name, "ok" if r is ok else "failed", r is ok))
    assert max(estimate.cached_blocks(x.name, ok.block_hashes) for x in loads) == len(ok.block_hashes)
    assert max(estimate.cached_blocks(x.name, bad.block_hashes) for x in loads) == 0


def test_a_streamed_first_token_confirms_without_on_complete() -> None:
    """The virtual-time cluster reports first tokens but no completions: nothing is taken back
    or left pending there."""
    policy = make_policy("dualmap", CTX)
    loads = [InstanceLoad(f"w{i}") for i in range(2)]
    r = req("a")
    i = policy.route(r, loads).index
    policy.on_dispatch(r, i, loads)
    policy.on_first_token("a", 0.3)
    policy.on_complete(r, Outcome(loads[i].name, "failed", False))   # too late: it was prefilled
    estimate = policy.cache_estimate()
    assert estimate is not None and estimate.cached_blocks(loads[i].name, r.block_hashes) == len(r.block_hashes)


class Recording(LeastLoaded):
    def __init__(self) -> None:
        super().__init__(CTX)
        self.completed: list[tuple[str, Outcome]] = []
        self.first: list[tuple[str, float | None]] = []

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        self.first.append((request_id, ttft_s))

    def on_complete(self, request: RequestView, outcome: Outcome) -> None:
        self.completed.append((request.request_id, outcome))


def test_an_attempt_reports_one_first_token_and_one_completion() -> None:
    policy = Recording()
    pool = Pool(endpoints(2), policy)
    chosen = pool.choose(req("a"))
    assert chosen is not None
    member = chosen[0]
    attempt = Attempt(pool, member, req("a"))
    attempt.end()          # cut off before anything came back
    assert policy.first == [("a", None)]
    assert policy.completed == [("a", Outcome(member.endpoint.name, "cancelled", False))]
    assert member.load.in_flight == 0 and member.load.pending_prefill_tokens == 0

    chosen = pool.choose(req("b"))
    assert chosen is not None
    attempt = Attempt(pool, chosen[0], req("b"))
    attempt.first_token(0.5)
    attempt.first_token(0.7)   # a second report is ignored
    attempt.status = "ok"
    attempt.end()
    assert policy.first[1:] == [("b", 0.5)]
    assert policy.completed[1] == ("b", Outcome(chosen[0].endpoint.name, "ok", True))
    assert chosen[0].load.pending_prefill_tokens == 0


# -- exclusion: a filter, not a membership change ---------------------------------------------------
@pytest.fixture
def rebuilds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    count = [0]
    original = hashring.HashRing._rebuild

    def counted(self: hashring.HashRing) -> None:
        count[0] += 1
        original(self)

    monkeypatch.setattr(hashring.HashRing, "_rebuild", counted)
    return count


@pytest.mark.parametrize("name", ["dualmap", "consistent-hash", "affinity"])
def test_a_retry_or_a_full_pick_rebuilds_no_ring(name: str, rebuilds: list[int]) -> None:
    pool = Pool(endpoints(16), make_policy(name, CTX), max_inflight=4, hold=False)
    first = pool.choose(req("warm"))          # the first decision builds the rings for the membership
    assert first is not None
    built = rebuilds[0]
    assert built > 0
    for k in range(20):
        r = req(f"r{k}", text_id=k)
        chosen = pool.choose(r)
        assert chosen is not None
        # The retry of this request skips where it was tried.
        retry = pool.choose(r, frozenset({chosen[0].endpoint.name}))
        assert retry is not None and retry[0] is not chosen[0]
    # Fill a key's pick: the re-route goes elsewhere.
    r = req("full", text_id=99)
    pick = pool.choose(r)
    assert pick is not None
    pick[0].load.in_flight = pool.max_inflight
    again = pool.choose(r)
    assert again is not None and again[0] is not pick[0]
    assert rebuilds[0] == built, "exclusions must filter candidates, not change ring membership"


def test_exclusion_moves_a_key_where_removal_would() -> None:
    names = [f"pod-{i}" for i in range(12)]
    full = DualRing(names, vnodes=32)
    for gone in ("pod-3", "pod-7"):
        smaller = DualRing([n for n in names if n != gone], vnodes=32)
        for key in range(0, 1 << 62, (1 << 62) // 2000):
            assert full.candidates(key, {gone}) == smaller.candidates(key)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_honours_exclusion(name: str) -> None:
    policy = make_policy(name, CTX)
    loads = [InstanceLoad(f"w{i}") for i in range(6)]
    for k in range(30):
        r = req(f"r{k}", text_id=k % 5)
        excluded = {f"w{j}" for j in range(6) if (j + k) % 3 == 0}
        d = policy.route(r, loads, excluded)
        assert loads[d.index].name not in excluded
        policy.on_dispatch(r, d.index, loads)
        policy.on_first_token(r.request_id, 0.1)
    with pytest.raises(LookupError):
        policy.route(req("none"), loads, {x.name for x in loads})


# -- P/D: the policy picks the pair --------------------------------------------------------------
class NearDecode(LeastLoaded):
    """Pairs prefill wK with decode dK (say, the same node)."""

    def route_decode(self, request: RequestView, instances: Sequence[InstanceLoad],
                     excluded: Set[str] = NOTHING) -> Decision:
        want = "d" + request.prefill_instance[1:]
        for i, inst in enumerate(instances):
            if inst.name == want and inst.name not in excluded:
                return Decision(i, "paired")
        return super().route_decode(request, instances, excluded)


def test_the_decode_pool_routes_with_the_models_pair_selection() -> None:
    decode = [Endpoint(name=f"d{i}", url=f"http://127.0.0.1:{9100 + i}") for i in range(4)]  # type: ignore[arg-type]
    pool = Pool(decode, DecodeSide(NearDecode(CTX)))
    r = req("a")
    r.prefill_instance = "w2"
    chosen = pool.choose(r)
    assert chosen is not None and chosen[0].endpoint.name == "d2" and chosen[1].reason == "paired"
    retry = pool.choose(r, frozenset({"d2"}))
    assert retry is not None and retry[0].endpoint.name != "d2"


def test_the_default_decode_half_balances_load() -> None:
    policy = make_policy("dualmap", CTX)
    loads = [InstanceLoad("d0", pending_prefill_tokens=500), InstanceLoad("d1", in_flight=3), InstanceLoad("d2")]
    assert policy.route_decode(req("a"), loads) == Decision(2, "least-loaded")
    assert policy.route_decode(req("a"), loads, {"d2"}).index == 1


# -- declared capabilities ---------------------------------------------------------------------------
def test_capabilities_are_declared_not_guessed() -> None:
    assert make_policy("round-robin", CTX).cache_estimate() is None
    assert make_policy("round-robin", CTX).ring_placement() is None
    assert make_policy("min-ttft", CTX).ring_placement() is None
    dualmap = make_policy("dualmap", CTX)
    placement = dualmap.ring_placement()
    assert dualmap.cache_estimate() is not None and placement is not None
    hashes = req("a").block_hashes
    assert placement.placement_key(hashes) == placement.placement_key(hashes)   # a peek: counts nothing


def test_handover_follows_any_policy_that_declares_ring_placement_and_an_estimate() -> None:
    handovers = Handovers(RouterMetrics())
    cfg = HandoverConfig(enabled=True)
    handovers.add_model("rr", Pool(endpoints(2), make_policy("round-robin", CTX)), cfg, 256)
    handovers.add_model("dm", Pool(endpoints(2), make_policy("dualmap", CTX)), cfg, 256)
    assert set(handovers.models) == {"dm"}
