"""kvpilot's policies fed from Ray Serve's view of a deployment (`kvpilot.ray.adapter`), without Ray:
membership from the replica set, load from the queue-length cache and routing stats, ranks out,
and exactly one `on_complete` per routed request."""

from __future__ import annotations

import logging
from collections.abc import Sequence, Set
from types import SimpleNamespace

import pytest

from kvpilot.ray.adapter import (
    CLAIM_TTL_S,
    STAT_KV_USAGE,
    STAT_RUNNING,
    STAT_SAMPLED_AT,
    STAT_WAITING,
    PolicyAdapter,
    StartedBySample,
    serve_policy,
)
from kvpilot.ray.prompt import CompletionCall, extract_prompt
from kvpilot.router.policies import DualMap, RoundRobin
from kvpilot.router.policy import NOTHING, BasePolicy, Decision, InstanceLoad, Outcome, PolicyContext, RequestView
from kvpilot.tokens import block_hashes, render_chat, token_count

REPLICAS = ["r4", "r1", "r3", "r2"]
PREFIXES = [f"system prompt {p}: " + "lorem ipsum dolor sit amet " * 80 for p in range(12)]


def _dualmap() -> PolicyAdapter:
    adapter = PolicyAdapter(DualMap())
    adapter.set_members(REPLICAS)
    return adapter


def test_membership_is_one_list_object_until_it_changes() -> None:
    adapter = PolicyAdapter(RoundRobin())
    assert adapter.set_members(REPLICAS)
    loads = adapter.loads
    assert [inst.name for inst in loads] == sorted(REPLICAS)
    loads[0].in_flight = 3
    assert not adapter.set_members(list(reversed(REPLICAS)))
    assert adapter.loads is loads
    assert adapter.set_members([*REPLICAS, "r5"])
    assert adapter.loads is not loads
    assert adapter.loads[0].in_flight == 3  # a replica that stays keeps its load


def test_prompts_sharing_a_prefix_rank_the_same_replica_first_in_every_router() -> None:
    """Serve runs one router per handle owner, sharing nothing: DualMap's rings must agree anyway."""
    a, b = _dualmap(), _dualmap()
    for p, prefix in enumerate(PREFIXES):
        picks = set()
        for i in range(5):
            for adapter in (a, b):
                ranks = adapter.rank(f"{p}-{i}", prefix + f"question {i}", REPLICAS)
                picks.add(ranks[0][0])
                assert len(ranks[0]) == 1 and sorted(ranks[0] + ranks[1]) == sorted(REPLICAS)
        assert len(picks) == 1, f"prefix {p} ranked first on {picks}"
    firsts = {a.rank(f"x{p}", prefix, REPLICAS)[0][0] for p, prefix in enumerate(PREFIXES)}
    assert len(firsts) > 1, "every prefix on one replica: the key does not depend on the prompt"


def test_the_pick_is_always_a_candidate() -> None:
    adapter = _dualmap()
    for p, prefix in enumerate(PREFIXES):
        for candidates in (["r1", "r2"], ["r3", "r4"], ["r2", "r3", "r4"]):
            ranks = adapter.rank(f"{p}-{candidates}", prefix, candidates)
            assert ranks[0][0] in candidates
            assert sorted(name for rank in ranks for name in rank) == sorted(candidates)


def test_no_prompt_or_one_candidate_is_one_rank_of_all() -> None:
    adapter = _dualmap()
    assert adapter.rank("a", None, REPLICAS) == [REPLICAS]
    assert adapter.rank("b", PREFIXES[0], ["r2"]) == [["r2"]]


class Recorder(BasePolicy):
    """Routes to the first allowed instance and records the feedback it gets."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.dispatched: list[tuple[str, str]] = []
        self.first_tokens: list[tuple[str, float | None]] = []
        self.completed: list[tuple[str, Outcome]] = []

    def route(self, request: RequestView, instances: Sequence[InstanceLoad],
              excluded: Set[str] = NOTHING) -> Decision:
        return Decision(next(i for i, inst in enumerate(instances) if inst.name not in excluded), "first")

    def on_dispatch(self, request: RequestView, index: int, instances: Sequence[InstanceLoad]) -> None:
        self.dispatched.append((request.request_id, instances[index].name))

    def on_first_token(self, request_id: str, ttft_s: float | None) -> None:
        self.first_tokens.append((request_id, ttft_s))

    def on_complete(self, request: RequestView, outcome: Outcome) -> None:
        self.completed.append((request.request_id, outcome))


def test_routed_and_completed_drive_the_policy_and_the_load_once_each() -> None:
    policy = Recorder()
    adapter = PolicyAdapter(policy)
    adapter.set_members(REPLICAS)
    prompt = PREFIXES[0]
    assert adapter.rank("q1", prompt, ["r3", "r4"])[0] == ["r3"]
    assert policy.dispatched == [("q1", "r3")]   # counted at the pick as soon as it is ranked
    adapter.routed("q1", "r4")   # Serve fell through to the second rank: the claim moves where it went
    assert policy.dispatched == [("q1", "r3"), ("q1", "r4")]
    assert [(rid, o.instance, o.status, o.prefilled) for rid, o in policy.completed] == [
        ("q1", "r3", "cancelled", False)]
    r3, r4 = adapter.load("r3"), adapter.load("r4")
    assert r3 is not None and r4 is not None
    assert (r3.in_flight, r3.pending_prefill_tokens) == (0, 0)
    assert (r4.in_flight, r4.pending_prefill_tokens) == (1, token_count(prompt))
    adapter.completed("q1", "r4")
    adapter.completed("q1", "r4")   # a second report changes nothing
    adapter.completed("never-routed")
    assert [(rid, o.instance, o.status) for rid, o in policy.completed][1:] == [("q1", "r4", "ok")]
    assert policy.first_tokens == [("q1", None)] * 2   # unobserved: told at completion, with no TTFT
    assert (r4.in_flight, r4.pending_prefill_tokens) == (0, 0)
    assert adapter.in_flight() == 0


def test_a_burst_ranked_before_serve_reports_any_of_it_is_spread() -> None:
    """Serve ranks each request of a burst within milliseconds and reports where each went only after
    its asynchronous assignment. Counted only then, every new prefix of a burst saw the same loads
    and went to the same replica (live Mooncake: 3.9 placements in a row on one replica)."""
    for claim, spread in ((True, len(REPLICAS)), (False, 1)):
        adapter = PolicyAdapter(serve_policy("dualmap", PolicyContext()), claim=claim)
        adapter.set_members(REPLICAS)
        picks = [adapter.rank(f"b{p}", PREFIXES[p], REPLICAS)[0][0] for p in range(len(REPLICAS))]
        assert len(set(picks)) == spread, picks
        for p, pick in enumerate(picks):
            adapter.routed(f"b{p}", pick)
        assert sum(load.pending_prefill_tokens for load in adapter.loads) == sum(
            token_count(PREFIXES[p]) for p in range(len(REPLICAS)))   # each counted once


def test_a_request_ranked_again_or_turned_away_gives_its_claim_back() -> None:
    """Serve ranks a request again after backing off (its pick was full) or after the replica turned
    it away (an attempt that ends before it is reported routed); a stale end of an earlier attempt
    elsewhere changes nothing."""
    policy = Recorder()
    adapter = PolicyAdapter(policy)
    adapter.set_members(REPLICAS)
    tokens = token_count(PREFIXES[0])
    adapter.rank("q", PREFIXES[0], REPLICAS)                 # r1
    adapter.rank("q", PREFIXES[0], ["r2", "r3"])             # backed off, r1 excluded: r2
    r1, r2 = adapter.load("r1"), adapter.load("r2")
    assert r1 is not None and r2 is not None
    assert (r1.pending_prefill_tokens, r2.pending_prefill_tokens) == (0, tokens)
    adapter.completed("q", "r1")                             # the end of the first attempt: stale
    assert r2.pending_prefill_tokens == tokens
    adapter.completed("q", "r2")                             # r2 turned it away
    assert r2.pending_prefill_tokens == 0
    assert [(o.instance, o.status, o.prefilled) for _, o in policy.completed] == [
        ("r1", "cancelled", False), ("r2", "cancelled", False)]
    adapter.routed("q", "r2")                                # Serve's retry got in there
    assert policy.dispatched == [("q", "r1"), ("q", "r2"), ("q", "r2")]
    assert (r2.in_flight, r2.pending_prefill_tokens) == (1, tokens)
    adapter.completed("q", "r2")
    assert [o.status for _, o in policy.completed] == ["cancelled", "cancelled", "ok"]
    assert adapter.in_flight() == 0


def test_a_claim_given_back_leaves_dualmap_as_if_it_had_never_been_ranked() -> None:
    """Its backlog, its shadow-cache blocks and its share of what was placed there all go: the next
    new prefix is placed where the withdrawn one was."""
    adapter = PolicyAdapter(serve_policy("dualmap", PolicyContext()))
    adapter.set_members(REPLICAS)
    policy = adapter.policy
    assert isinstance(policy, DualMap)
    first = adapter.rank("a", PREFIXES[0], REPLICAS)[0][0]
    assert policy.estimate.cached_blocks(first, block_hashes(PREFIXES[0], 16)) > 0
    adapter.completed("a", first)                            # turned away
    assert policy.estimate.cached_blocks(first, block_hashes(PREFIXES[0], 16)) == 0
    assert policy.holding.wait_for(first, 0) == 0
    assert adapter.rank("b", PREFIXES[1], REPLICAS)[0][0] == first


def test_claims_of_requests_serve_gave_up_on_expire() -> None:
    """A request cancelled while Serve backed off is never ranked or reported again: its claim goes
    once it is that stale, or once too many are pending."""
    clock = Clock()
    policy = Recorder()
    adapter = PolicyAdapter(policy, clock=clock)
    adapter.set_members(REPLICAS)
    adapter.rank("gone", PREFIXES[0], REPLICAS)
    clock.now += CLAIM_TTL_S / 2
    adapter.rank("live", PREFIXES[1], REPLICAS)
    assert policy.completed == []
    clock.now += CLAIM_TTL_S * 0.6
    adapter.rank("next", PREFIXES[2], REPLICAS)
    assert [(rid, o.status) for rid, o in policy.completed] == [("gone", "cancelled")]
    r1 = adapter.load("r1")
    assert r1 is not None and r1.pending_prefill_tokens == token_count(PREFIXES[1]) + token_count(PREFIXES[2])
    adapter.removed("r1")                                    # the pick died before Serve reported either
    assert [rid for rid, _ in policy.completed] == ["gone", "live", "next"]


def test_a_sample_shows_which_requests_started_and_their_prefill_ends_their_own_time_later() -> None:
    """vLLM serves first come, first served: with `waiting` waiting at the sample, all but the newest
    `waiting` of those sent before it started; each is done its own prefill time after the sample."""
    starts = StartedBySample()
    for i, at in enumerate([1.0, 2.0, 3.0, 4.0]):
        starts.sent("r1", f"q{i}", at)
    own = {"q0": 0.5, "q1": 0.1, "q2": 0.0, "q3": 0.0}.__getitem__
    starts.sample("r1", 1, 3.5, own)                      # q3 was sent after the sample
    assert starts.done(3.55) == []
    assert starts.done(3.6) == ["q1"]
    starts.sample("r1", 0, 3.5, own)                      # the same sample again: nothing
    starts.sample("r1", 0, 3.0, own)                      # an older one: nothing
    assert starts.done(10.0) == ["q0"]
    starts.sample("r1", 5, 5.0, own)                      # other routers' requests waiting too: none inferred
    starts.ended("r1", "q2")                              # completed before any sample showed it started
    starts.sample("r1", 0, 6.0, own)
    assert starts.done(6.0) == ["q3"]
    starts.sent("r2", "x", 6.0)
    starts.sample("r2", 0, 7.0, lambda rid: 1.0)
    starts.ended("r2", "x")                               # completed while prefilling: never named
    assert starts.done(9.0) == []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_stats_sample_releases_the_backlog_of_requests_it_shows_started() -> None:
    clock = Clock()
    policy = Recorder()
    adapter = PolicyAdapter(policy, clock=clock)
    adapter.set_members(REPLICAS)
    for rid in ("q1", "q2", "q3"):
        adapter.rank(rid, PREFIXES[0], REPLICAS)
        adapter.routed(rid, "r1")
    r1 = adapter.load("r1")
    assert r1 is not None
    tokens = token_count(PREFIXES[0])
    clock.now += 1
    adapter.observe("r1", 3, {STAT_WAITING: 1})                    # no sample time: nothing inferred
    assert policy.first_tokens == [] and r1.pending_prefill_tokens == 3 * tokens
    adapter.observe("r1", 3, {STAT_WAITING: 1, STAT_SAMPLED_AT: clock.now})
    assert policy.first_tokens == [("q1", None), ("q2", None)]     # no estimate here: no prefill time
    assert r1.pending_prefill_tokens == tokens
    adapter.completed("q1")   # the first token was told already: only the completion now
    adapter.completed("q3")
    assert policy.first_tokens == [("q1", None), ("q2", None), ("q3", None)]
    assert [rid for rid, _ in policy.completed] == ["q1", "q3"]
    assert (r1.in_flight, r1.pending_prefill_tokens) == (1, 0)


def test_dualmap_inside_serve_counts_a_started_prefill_in_its_predicted_wait_until_it_is_done() -> None:
    """What the inference is for: without a first token, a started request's prefill stayed in
    DualMap's predicted wait until it completed, and DualMap switched prompts off their cache; a
    long prompt is still prefilling after it started, so it leaves the wait only then."""
    clock = Clock()
    adapter = PolicyAdapter(DualMap(), clock=clock)
    adapter.set_members(REPLICAS)
    policy = adapter.policy
    assert isinstance(policy, DualMap)
    for i in range(4):
        adapter.rank(f"q{i}", PREFIXES[i], REPLICAS)
        adapter.routed(f"q{i}", "r1")
    loaded = policy.holding.wait_for("r1", 0)
    own = policy.estimate.prefill_s("q0")
    assert loaded > 0 and 0 < own < loaded
    clock.now += 1
    adapter.observe("r1", 4, {STAT_WAITING: 0, STAT_SAMPLED_AT: clock.now})
    assert policy.holding.wait_for("r1", 0) == loaded              # started, still prefilling
    clock.now += own * 1.01
    adapter.rank("next", PREFIXES[5], REPLICAS)                    # each routing call releases what is due
    assert policy.holding.wait_for("r1", 0) < loaded / 10


def test_a_slowed_simulator_keeps_a_started_prefill_in_the_wait_for_its_wall_time() -> None:
    """The predicted prefill time is engine time; the replicas stamp their stats with the wall clock.
    At time scale 0.1 (the simulator 10× slower, as bench/ray_routing.py runs it) a prefill lasts 10×
    its engine time on that clock, and releasing it after its engine time left the backlog out of
    DualMap's predicted wait while it was still prefilling."""
    clock = Clock()
    adapter = PolicyAdapter(DualMap(), clock=clock, time_scale=0.1)
    adapter.set_members(REPLICAS)
    policy = adapter.policy
    assert isinstance(policy, DualMap)
    adapter.rank("q0", PREFIXES[0], REPLICAS)
    adapter.routed("q0", "r1")
    loaded = policy.holding.wait_for("r1", 0)
    own = policy.estimate.prefill_s("q0")
    clock.now += 1
    adapter.observe("r1", 1, {STAT_WAITING: 0, STAT_SAMPLED_AT: clock.now})
    clock.now += own * 1.01                                        # its engine time: still prefilling here
    adapter.rank("next", PREFIXES[5], REPLICAS)
    assert policy.holding.wait_for("r1", 0) == loaded
    clock.now += own * 9                                           # past its wall time
    adapter.rank("later", PREFIXES[6], REPLICAS)
    assert policy.holding.wait_for("r1", 0) < loaded


def test_load_comes_from_the_queue_cache_else_the_routers_own_count() -> None:
    adapter = PolicyAdapter(Recorder())
    adapter.set_members(REPLICAS)
    adapter.rank("q", PREFIXES[0], REPLICAS)
    adapter.routed("q", "r2")
    r2 = adapter.load("r2")
    assert r2 is not None
    adapter.observe("r2", 5, {STAT_RUNNING: 3, STAT_WAITING: 2, STAT_KV_USAGE: 0.25})
    assert (r2.in_flight, r2.engine_running, r2.engine_waiting, r2.kv_usage) == (5, 3, 2, 0.25)
    adapter.observe("r2", None, {STAT_RUNNING: "garbage"})
    assert (r2.in_flight, r2.engine_running) == (1, 3)   # unknown queue: the one request this router sent
    adapter.observe("gone", 9, None)                      # not a member: ignored


def test_a_dead_replicas_requests_complete_as_failed_without_prefill() -> None:
    policy = Recorder()
    adapter = PolicyAdapter(policy)
    adapter.set_members(REPLICAS)
    adapter.rank("q", PREFIXES[0], REPLICAS)
    adapter.routed("q", "r1")
    adapter.removed("r1")
    assert [(rid, o.status, o.prefilled) for rid, o in policy.completed] == [("q", "failed", False)]
    assert "r1" not in [inst.name for inst in adapter.loads]
    adapter.completed("q")
    assert len(policy.completed) == 1


def test_the_prompt_is_found_in_handle_arguments() -> None:
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert extract_prompt(["plain"], {}) == "plain"
    assert extract_prompt([{"prompt": "in a dict", "max_tokens": 3}], {}) == "in a dict"
    assert extract_prompt([{"prompt": ["one"]}], {}) == "one"
    assert extract_prompt([], {"other": 1, "prompt": "named"}) == "named"
    assert extract_prompt([SimpleNamespace(prompt="attr", messages=None)], {}) == "attr"
    assert extract_prompt([{"messages": chat}], {}) == render_chat(chat)   # as the simulator renders chats
    assert extract_prompt([CompletionCall("the ingress's call", 8)], {}) == "the ingress's call"
    assert extract_prompt([b"raw http body", 3], {}) is None
    assert extract_prompt([], {}) is None


def test_dualmap_inside_serve_sees_a_growing_sessions_whole_previous_turn() -> None:
    """Without first tokens, Serve's DualMap predicts waits from its shadow cache alone. The next turn
    of a session extends the last one, and the proxy's ladder (every 2^k-th block) sees the last
    turn only up to the ladder step below its end, hundreds of tokens short on long prompts."""
    turn1 = PREFIXES[0] + " ".join(f"call{i} result{i}" for i in range(4000))
    turn2 = turn1 + " " + " ".join(f"call{i} result{i}" for i in range(4000, 4800))
    full = token_count(turn1) // 16   # whole blocks of turn 1

    def seen(policy: DualMap) -> int:
        adapter = PolicyAdapter(policy)
        adapter.set_members(REPLICAS)
        name = adapter.rank("t1", turn1, REPLICAS)[0][0]
        adapter.routed("t1", name)
        adapter.completed("t1")
        return policy.estimate.cached_blocks(name, block_hashes(turn2, 16))

    serve = serve_policy("dualmap", PolicyContext())
    assert isinstance(serve, DualMap)
    assert seen(serve) == full
    assert seen(DualMap(PolicyContext())) < full - 8   # what the ladder would see: why Serve's is exact


def test_a_decision_is_traced_with_each_replicas_predicted_ttft(caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG, `kvpilot.ray` logs each decision with its reason and what the policy predicted the
    request would wait at every replica: a replica holding routed work predicts a longer wait, and
    one that holds the prompt's prefix a shorter prefill."""
    adapter = _dualmap()
    first = adapter.rank("a", PREFIXES[0] + "question 0", REPLICAS)[0][0]
    adapter.routed("a", first)
    with caplog.at_level(logging.DEBUG, logger="kvpilot.ray"):
        pick = adapter.rank("b", PREFIXES[1], REPLICAS)[0][0]
    (record,) = [r for r in caplog.records if r.name == "kvpilot.ray"]
    assert f"to {pick} (" in record.getMessage()
    predicted = record.args[-1]
    assert isinstance(predicted, dict) and sorted(predicted) == sorted(REPLICAS)
    idle = [name for name in REPLICAS if name != first]
    assert predicted[first] > max(predicted[name] for name in idle)   # "a" is still prefilling there
    same = adapter.predicted_ttfts(adapter.view("c", PREFIXES[0] + "question 1"))
    assert same[first] < predicted[first]   # its prefix is cached there: only the question is new
    assert PolicyAdapter(RoundRobin()).predicted_ttfts(adapter.view("d", "x")) == {}
