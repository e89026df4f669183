"""DualMap's first cut: affinity under light load, the SLO switch, calibration."""

from __future__ import annotations

import zlib

from kvpilot.router.estimate import EXACT
from kvpilot.router.policies import make_policy
from kvpilot.router.policies.dualmap import DualMap
from kvpilot.router.policy import InstanceLoad, PolicyContext, RequestView
from kvpilot.tokens import segment_block_hashes

CTX = PolicyContext(slo_ttft_s=2.0, block_size=16, kv_capacity_tokens=100_000)
INSTANCES = [InstanceLoad(f"pod-{i}") for i in range(8)]


def request(rid: str, prefix: int, tokens: int = 2048) -> RequestView:
    own = zlib.crc32(rid.encode())   # stable across processes, unlike hash(str)
    segments = [prefix, prefix + 1, 10_000 + own % 10_000, 20_000 + own % 10_000]
    return RequestView(rid, tokens, segment_block_hashes(segments, 512, tokens, 16))


def test_a_cold_shared_prefix_sticks_to_one_instance_under_light_load() -> None:
    policy = DualMap(CTX)
    chosen = set()
    for i in range(400):
        # One prefix in 20 requests (5%, under half an instance's fair share of 1/8): cold.
        req = request(f"r{i}", prefix=100) if i % 20 == 0 else request(f"o{i}", prefix=1000 * (i + 1))
        d = policy.route(req, INSTANCES)
        policy.on_dispatch(req, d.index, INSTANCES)
        policy.on_first_token(req.request_id, 0.05)  # served at once: no backlog builds up
        assert d.reason == "affinity"
        if i % 20 == 0:
            chosen.add(d.index)
    assert len(chosen) == 1
    # Different prefixes spread over the ring.
    spread = {policy.route(request(f"p{p}", prefix=1000 * p), INSTANCES).index for p in range(1, 40)}
    assert len(spread) >= 6


def test_a_hot_shared_prefix_spreads_by_what_follows_it() -> None:
    policy = DualMap(CTX)
    chosen = set()
    for i in range(200):
        # Half the traffic behind one prefix: its requests differ after it (sessions).
        req = request(f"r{i}", prefix=100) if i % 2 else request(f"o{i}", prefix=1000 * (i + 1))
        d = policy.route(req, INSTANCES)
        policy.on_dispatch(req, d.index, INSTANCES)
        policy.on_first_token(req.request_id, 0.05)
        if i % 2 and i > 100:
            chosen.add(d.index)
    assert len(chosen) >= 6          # served by (nearly) the whole fleet, not one pair
    # The fixed-depth key (the earlier behaviour, kept as an ablation) keeps it on one pair.
    fixed = DualMap(CTX, keying="fixed")
    assert len({fixed.route(request(f"r{i}", prefix=100), INSTANCES).index for i in range(50)}) <= 2


def test_slo_switch_flips_exactly_at_threshold() -> None:
    policy = DualMap(CTX, theta=0.5, prefill_token_s=1e-4)
    req = request("probe", prefix=7)
    first = policy.route(req, INSTANCES)
    policy.on_dispatch(req, first.index, INSTANCES)   # warms the shadow cache: this is now the affine one
    name = INSTANCES[first.index].name
    uncached = policy.estimate.uncached(name, req)
    limit_tokens = round(0.5 * 2.0 / 1e-4)            # θ·SLO in tokens of backlog
    policy.estimate.backlog[name] = limit_tokens - uncached   # predicted TTFT == θ·SLO: stay
    assert policy.route(req, INSTANCES) == first
    policy.estimate.backlog[name] += 1                        # just over: switch to the other candidate
    switched = policy.route(req, INSTANCES)
    assert switched.reason == "slo-fallback" and switched.index != first.index


def test_first_token_calibrates_per_token_time_and_drains_backlog() -> None:
    policy = DualMap(CTX, prefill_token_s=1e-5, ewma=1.0, attention_tokens=0)  # linear work: tokens
    req = request("cal", prefix=3, tokens=4096)
    d = policy.route(req, INSTANCES)
    policy.on_dispatch(req, d.index, INSTANCES)
    name = INSTANCES[d.index].name
    assert policy.estimate.backlog[name] == 4096
    policy.on_first_token("cal", 0.4096)
    assert policy.estimate.backlog[name] == 0
    assert abs(policy.estimate.token_s[name] - 1e-4) < 1e-12


def test_registry_builds_dualmap_with_context() -> None:
    policy = make_policy("dualmap", CTX)
    assert isinstance(policy, DualMap) and policy.depth == 1024 // 16


def test_shadow_cache_evicts_tails_first_and_matches_prefixes() -> None:
    from kvpilot.router.estimate import ShadowCache

    cache = ShadowCache(capacity_blocks=5, max_blocks=100)
    a = [1, 2, 3, 4]
    cache.insert(a)
    assert cache.match(a) == 4 and cache.match([1, 2, 9, 4]) == 2 and cache.match([9]) == 0
    cache.insert([1, 2, 7, 8])  # shares the head; pushes out a's tail block, never its head
    assert cache.match(a) == 3
    assert cache.match([1, 2, 7, 8]) == 4
    capped = ShadowCache(capacity_blocks=100, max_blocks=3)
    capped.insert(a)
    assert capped.match(a) == 3  # only the first max_blocks are tracked


def test_rebalancing_moves_queued_requests_without_losing_or_duplicating() -> None:
    # A fixed-depth key: the queue mechanics on one key (hot-prefix keying would spread it).
    policy = DualMap(CTX, theta=100.0, prefill_token_s=1e-4, release_tokens=4096, steal=False, keying="fixed")
    held: list[str] = []
    # Thirty requests behind one prefix, routed while the threshold is lax: all queue on one instance.
    for i in range(30):
        req = request(f"h{i}", prefix=555, tokens=4096)
        d = policy.route(req, INSTANCES)
        policy.hold(req, d.index, INSTANCES, d.reason)
        held.append(req.request_id)
    assert len(policy.holding.queues) == 1
    policy.theta = 0.5  # the SLO tightens (or the instance slowed): its queue is now a hot spot
    released = []
    for view, index, reason in policy.release(INSTANCES):
        policy.on_dispatch(view, index, INSTANCES)
        released.append((view.request_id, index, reason))
    queued = [h.request.request_id for q in policy.holding.queues.values() for h in q]
    ids = [r for r, _, _ in released] + queued
    assert sorted(ids) == sorted(held)  # every request exactly once: released or still queued
    assert policy.holding.moves > 0
    homes = {h.home for q in policy.holding.queues.values() for h in q} | {INSTANCES[i].name for _, i, _ in released}
    assert len(homes) == 2  # spread over the prefix's two candidates, no further
    # As first tokens come back, the rest drain; nothing is left behind, nothing starts twice.
    started = [r for r, _, _ in released]
    while policy.holding.queues and len(policy.holding):
        for rid, _, _ in released:
            policy.on_first_token(rid, 0.1)
        released = [(v.request_id, i, r) for v, i, r in policy.release(INSTANCES)]
        for rid, i, _ in released:
            policy.on_dispatch(request(rid, 555, 4096), i, INSTANCES)
        started += [r for r, _, _ in released]
    assert len(policy.holding) == 0
    assert sorted(started) == sorted(held)


def test_attention_term_makes_long_prompts_cost_more_per_token() -> None:
    est = DualMap(CTX, attention_tokens=20_000).estimate
    est.track(INSTANCES)
    short = RequestView("s", 2_000, list(range(1, 126)))
    long = RequestView("l", 80_000, list(range(1_000, 6_000)))   # 5,000 blocks of 16
    per_token = [est.uncached("pod-0", r) / r.prompt_tokens for r in (short, long)]
    assert 1.0 < per_token[0] < 1.1 and 2.9 < per_token[1] < 3.1   # 1 + (u/2)/20k
    est.caches["pod-0"].capacity = 10_000
    est.caches["pod-0"].insert(long.block_hashes)
    assert est.uncached("pod-0", long) == 1 + 79_999 // 20_000    # all but the last token cached: a long
    # prompt's whole cached prefix is seen, not just its head (the ladder spans every block)


def test_queues_start_the_least_work_first_and_never_starve() -> None:
    policy = DualMap(CTX, prefill_token_s=1e-4, release_tokens=1, steal=False, max_wait_slos=1.0)
    policy.estimate.track(INSTANCES)
    name = INSTANCES[0].name
    policy.estimate.backlog[name] = 10_000   # busy: everything queues
    sizes = {"big": 16_384, "mid": 8_192, "small": 1_024}
    for t, (rid, tokens) in enumerate(sizes.items()):
        policy.hold(RequestView(rid, tokens, request(rid, 9_000 + t, tokens).block_hashes, arrival=0.1 * t),
                    0, INSTANCES, "affinity")
    order = []
    while len(policy.holding):
        policy.estimate.backlog[name] = 0    # the previous prefill is done
        released = policy.release(INSTANCES)
        assert len(released) == 1
        order.append(released[0][0].request_id)
    assert order == ["small", "mid", "big"]
    # The oldest goes first once it has waited longer than max_wait (1 × SLO = 2 s).
    policy.estimate.backlog[name] = 10_000
    for t, (rid, tokens) in enumerate(sizes.items()):
        policy.hold(RequestView(rid, tokens, request(rid, 9_100 + t, tokens).block_hashes, arrival=10.0 + t),
                    0, INSTANCES, "affinity")   # the clock is now 12 s: "big" (10 s) has waited 2 s
    policy.hold(RequestView("late", 512, request("late", 9_200, 512).block_hashes, arrival=12.5), 0, INSTANCES,
                "affinity")
    policy.estimate.backlog[name] = 0
    assert policy.release(INSTANCES)[0][0].request_id == "big"


def test_idle_instances_take_over_waiting_requests_once_each() -> None:
    policy = DualMap(CTX, theta=0.5, prefill_token_s=1e-4, release_tokens=4096, keying="fixed")
    ids: list[str] = []
    for i in range(40):   # one hot prefix: everything is routed to its two candidates
        req = request(f"s{i}", prefix=777, tokens=4096)
        d = policy.route(req, INSTANCES)
        policy.hold(req, d.index, INSTANCES, d.reason)
        ids.append(req.request_id)
    released = policy.release(INSTANCES)
    used = {i for _, i, _ in released}
    assert len(used) == len(INSTANCES)                # every idle instance started something
    assert any(reason == "steal" for _, _, reason in released)
    seen = [v.request_id for v, _, _ in released]
    while len(policy.holding):
        for v, i, _ in released:
            policy.on_dispatch(v, i, INSTANCES)
            policy.on_first_token(v.request_id, 0.4)
        released = policy.release(INSTANCES)
        assert released
        seen += [v.request_id for v, _, _ in released]
    assert sorted(seen) == sorted(ids)               # each exactly once


def test_dualmap_in_the_cluster_serves_every_request_once() -> None:
    from kvpilot.sim.cluster import Cluster, ClusterConfig
    from kvpilot.sim.workload import mooncake

    specs = mooncake(limit=800, speedup=6.0)
    report = Cluster(ClusterConfig(instances=4, policy="dualmap", block_size=64)).run(specs)
    assert sorted(r.request_id for r in report.results) == sorted(s.request_id for s in specs)
    reasons = {r.reason for r in report.results}
    assert "affinity" in reasons and ("rebalance" in reasons or "slo-fallback" in reasons)


def test_release_waits_for_kv_room_on_a_busy_instance() -> None:
    policy = DualMap(CTX, prefill_token_s=1e-4, steal=False, kv_high=0.9)
    loads = [InstanceLoad(f"pod-{i}") for i in range(8)]
    req = request("kv", prefix=31, tokens=4096)
    d = policy.route(req, loads)
    policy.hold(req, d.index, loads, d.reason)
    loads[d.index].in_flight, loads[d.index].kv_usage = 3, 0.88   # 4,096 of 100k tokens more would pass 0.9
    assert policy.release(loads) == []
    loads[d.index].kv_usage = 0.5
    assert [v.request_id for v, _, _ in policy.release(loads)] == ["kv"]
    policy.hold(req, d.index, loads, d.reason)
    loads[d.index].in_flight, loads[d.index].kv_usage = 0, 0.99     # nothing in flight: always room
    assert [v.request_id for v, _, _ in policy.release(loads)] == ["kv"]



def test_a_switch_pays_for_the_prefill_it_adds() -> None:
    """Past θ·SLO the other candidate must be faster even after the cached prefix it would compute
    again is charged once more; without the charge it only has to be faster."""
    for switch_cost, expected in ((True, "affinity"), (False, "slo-fallback")):
        policy = DualMap(CTX, theta=0.5, prefill_token_s=1e-4, switch_cost=switch_cost)
        req = request("probe", prefix=7)
        first = policy.route(req, INSTANCES)
        policy.on_dispatch(req, first.index, INSTANCES)   # the affine candidate now holds the prompt
        est = policy.estimate
        name = INSTANCES[first.index].name
        est.backlog[name] = 10**6
        other = INSTANCES[policy.route(req, INSTANCES).index].name   # overloaded: the switch shows the other
        cached_work, work = est.uncached(name, req), est.uncached(other, req)
        assert work - cached_work > 1000                  # the switch would prefill the prompt again
        est.backlog[name] = round(0.5 * 2.0 / 1e-4) - cached_work + 1      # just past θ·SLO
        est.backlog[other] = round(0.9 / 1e-4) - work                       # other: 0.9 s, faster alone
        decision = policy.route(req, INSTANCES)
        assert decision.reason == expected, switch_cost
        assert INSTANCES[decision.index].name == (name if switch_cost else other)


def test_inside_serve_the_longest_cached_prefix_leads() -> None:
    """`follow_slos` (Serve's DualMap): once some instance's cache saves at least `follow_share` of
    the prompt's prefill work, the one holding the most takes it (of equal holders, the shortest predicted wait) while
    its wait is within follow_slos × SLO; off (the proxy's default) the pair keeps it."""
    req = request("turn", prefix=7)   # 2,048 tokens, 128 blocks
    for follow_slos in (None, 4.0):
        policy = DualMap(CTX, prefill_token_s=1e-4, follow_slos=follow_slos, follow_share=0.1, shadow_dense=EXACT)
        first = policy.route(req, INSTANCES)
        pair = {INSTANCES[first.index].name, policy._other[req.request_id]}
        third, fourth = [inst.name for inst in INSTANCES if inst.name not in pair][:2]
        est = policy.estimate
        est.learn(third, req.block_hashes[:12])        # 192 tokens: saves 9% of the prefill work, under the share
        assert policy.route(req, INSTANCES) == first
        est.learn(third, req.block_hashes[:16])        # 256 tokens: 12%, follows
        decision = policy.route(req, INSTANCES)
        if follow_slos is None:
            assert decision == first
            continue
        assert decision.reason == "follow" and INSTANCES[decision.index].name == third
        est.learn(third, req.block_hashes)             # the whole prompt, and another holder as long
        est.learn(fourth, req.block_hashes)
        work = est.uncached(third, req)
        est.backlog[third] = 1000
        assert INSTANCES[policy.route(req, INSTANCES).index].name == fourth   # the shorter wait of the two
        limit_tokens = round(4.0 * 2.0 / 1e-4)
        est.backlog[third] = est.backlog[fourth] = limit_tokens - work - 1    # just within 4 × SLO: follows
        assert policy.route(req, INSTANCES).reason == "follow"
        est.backlog[third] = est.backlog[fourth] = limit_tokens - work + 1    # just past it: the pair keeps it
        assert policy.route(req, INSTANCES) == first


def test_inside_serve_a_new_prefix_takes_the_shorter_wait_of_its_pair() -> None:
    """Below the share, where the pair's two hold as much, the one with the shorter predicted wait
    takes it (two choices); the proxy's DualMap keeps the first candidate until θ·SLO."""
    req = request("new", prefix=11)
    for follow_slos, expected in ((None, "affinity"), (4.0, "two-choices")):
        policy = DualMap(CTX, prefill_token_s=1e-4, follow_slos=follow_slos)
        first = policy.route(req, INSTANCES)
        assert first.reason == "affinity"
        name, other = INSTANCES[first.index].name, policy._other[req.request_id]
        policy.estimate.backlog[name] = 100            # 0.01 s: far under θ·SLO
        decision = policy.route(req, INSTANCES)
        assert decision.reason == expected
        assert INSTANCES[decision.index].name == (name if follow_slos is None else other)


def test_inside_serve_a_new_prefix_goes_where_the_least_was_placed() -> None:
    """`place_slos` (Serve's DualMap): a prompt no cache saves `follow_share` of goes to the instance
    sent the least prompt content it did not hold, of those whose predicted wait is within
    place_slos × SLO, else to the shortest wait; the key's pair (whose placement depends on the
    instances' names) no longer decides. Its next turn follows it there."""
    policy = DualMap(CTX, prefill_token_s=1e-4, follow_slos=8.0, follow_share=0.1, place_slos=2.0,
                     shadow_dense=EXACT)
    est = policy.estimate

    def send(req: RequestView) -> str:
        decision = policy.route(req, INSTANCES)
        policy.on_dispatch(req, decision.index, INSTANCES)
        return INSTANCES[decision.index].name

    names = [inst.name for inst in INSTANCES]
    firsts = [send(request(f"new-{p}", prefix=100 + 2 * p)) for p in range(len(INSTANCES))]
    assert sorted(firsts) == sorted(names)                    # eight new prefixes, one on each instance
    turn = request("new-3", prefix=106, tokens=4096)          # the fourth prefix's next, longer turn
    assert send(turn) == firsts[3]
    # Now the instance with the fourth prefix has been sent the most; of the rest, all but one are
    # past 2 × SLO of predicted wait, so a new prefix goes to that one, however much it was sent.
    limit_tokens = round(2 * 2.0 / 1e-4)
    spare = firsts[5]
    for name in names:
        if name != spare:
            est.backlog[name] = limit_tokens + 1
    est.backlog[spare] = limit_tokens // 2
    assert send(request("busy", prefix=900)) == spare
    # All past it: the shortest wait.
    for name in names:
        est.backlog[name] = limit_tokens + 1000
    est.backlog[firsts[6]] = limit_tokens + 1
    assert send(request("all-busy", prefix=950)) == firsts[6]
