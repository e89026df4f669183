"""Active-active router replicas: the combined load view (router/engine_load.py) and the rings
that independently built replicas agree on."""

from __future__ import annotations

import zlib

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvpilot.router.engine_load import (
    PENDING_PROMPT_TOKENS,
    EngineSample,
    forget,
    observe,
    peer_share,
    read_metrics,
    total_in_flight,
)
from kvpilot.router.policies import make_policy
from kvpilot.router.policies.dualmap import DualMap
from kvpilot.router.policy import InstanceLoad, PolicyContext, RequestView
from kvpilot.tokens import segment_block_hashes

CTX = PolicyContext(slo_ttft_s=2.0, block_size=16, kv_capacity_tokens=100_000)


def request(rid: str, prefix: int, tokens: int = 2048) -> RequestView:
    own = zlib.crc32(rid.encode())
    segments = [prefix, prefix + 1, 10_000 + own % 10_000, 20_000 + own % 10_000]
    return RequestView(rid, tokens, segment_block_hashes(segments, 512, tokens, 16))


def test_peers_share_is_what_the_engine_reports_beyond_this_replicas_own() -> None:
    load = InstanceLoad("w0", in_flight=2, pending_prefill=1)
    observe(load, EngineSample(running=5, waiting=0, kv_usage=0.4))
    assert (load.peer_in_flight, load.peer_waiting) == (3, 0)
    assert (load.engine_running, load.kv_usage) == (5, 0.4)
    load.in_flight += 1                    # one more sent since the poll: the view moves with it
    assert total_in_flight(load) == 6
    load.in_flight -= 2                    # two of its own finished since: peers' share is held
    assert total_in_flight(load) == 4


def test_peers_waiting_counts_only_what_this_replicas_unstarted_requests_cannot_explain() -> None:
    # 4 waiting at the engine, 1 of them this replica's (its request not yet prefilled).
    assert peer_share(EngineSample(3, 4, 0.0), own_in_flight=2, own_unstarted=1) == (5, 3)
    # This replica's requests in transit (sent, not yet at the engine): never a negative share.
    assert peer_share(EngineSample(1, 0, 0.0), own_in_flight=4, own_unstarted=3) == (0, 0)
    # Waiting peers cannot outnumber peers.
    assert peer_share(EngineSample(0, 3, 0.0), own_in_flight=2, own_unstarted=0) == (1, 1)


def test_an_unreachable_engine_drops_the_peers_share() -> None:
    load = InstanceLoad("w0")
    observe(load, EngineSample(4, 2, 0.1))
    forget(load)
    assert total_in_flight(load) == 0 and load.peer_waiting == 0


def test_peers_waiting_work_enters_the_predicted_ttft_and_the_release_budget() -> None:
    loads = [InstanceLoad(f"pod-{i}") for i in range(4)]
    policy = DualMap(CTX, prefill_token_s=1e-4, release_tokens=4096, steal=False)
    warm = request("warm", prefix=1)
    d = policy.route(warm, loads)
    policy.hold(warm, d.index, loads, d.reason)
    [(released, index, _)] = policy.release(loads)
    policy.on_dispatch(released, index, loads)
    loads[index].in_flight += 1
    policy.on_first_token("warm", None)
    work = policy.estimate.mean_work
    assert work > 0
    name = loads[index].name
    before = policy.estimate.predicted_ttft(name, 100)
    # Another replica has two requests waiting there: they are priced at this one's mean work.
    observe(loads[index], EngineSample(running=1, waiting=2, kv_usage=0.0))
    assert policy.estimate.external(name) == int(2 * work)
    assert policy.estimate.predicted_ttft(name, 100) == pytest.approx(before + 1e-4 * 2 * work)
    # A request for the same prefix is held while the peers' work fills the release budget ...
    probe = request("probe", prefix=1)
    d = policy.route(probe, loads)
    assert loads[d.index].name == name
    policy.hold(probe, d.index, loads, d.reason)
    assert policy.release(loads) == []
    # ... and released once a poll shows it drained.
    observe(loads[index], EngineSample(running=1, waiting=0, kv_usage=0.0))
    assert [r.request_id for r, _, _ in policy.release(loads)] == ["probe"]


@pytest.mark.parametrize("name", ["dualmap", "consistent-hash", "affinity"])
def test_independently_built_replicas_map_the_same_prompts_to_the_same_instances(name: str) -> None:
    """Two replicas with the same membership (listed in a different order, as two watches may
    deliver it) agree on every prompt's instance with no shared state."""
    first = make_policy(name, CTX)
    second = make_policy(name, PolicyContext(slo_ttft_s=2.0, block_size=16, kv_capacity_tokens=100_000, seed=7))
    names = [f"pod-{i}" for i in range(6)]
    a = [InstanceLoad(n) for n in names]
    b = [InstanceLoad(n) for n in reversed(names)]
    picks = set()
    for p in range(200):
        req = request(f"r{p}", prefix=1000 * p)
        left, right = a[first.route(req, a).index].name, b[second.route(req, b).index].name
        assert left == right
        picks.add(left)
    assert len(picks) == len(names)     # and the prompts do spread over every instance


def test_where_the_engine_reports_its_queued_prompt_tokens_peers_work_is_priced_by_size() -> None:
    load = InstanceLoad("w0", in_flight=1, pending_prefill=1, pending_prefill_tokens=3000)
    observe(load, EngineSample(running=2, waiting=3, kv_usage=0.2, prompt_tokens=11_000))
    assert load.peer_prompt_tokens == 8000          # the engine's 11k less this replica's own 3k
    policy = DualMap(CTX, prefill_token_s=1e-4)
    loads = [load, InstanceLoad("w1")]
    req = request("a", prefix=3, tokens=4096)
    policy.route(req, loads)
    policy.on_dispatch(req, 1, loads)               # a cold 4k-token prompt: its work is its size (× attention)
    est = policy.estimate
    ratio = est.mean_work / est.mean_prompt
    assert ratio >= 1.0
    assert est.external("w0") == int(8000 * ratio)   # by size, not by count (3 waiting)
    forget(load)
    assert load.peer_prompt_tokens is None and est.external("w0") == 0


def _page(running: float, waiting: float, hits: float, *, pending: float | None) -> str:
    """An engine's /metrics as prometheus_client renders it: two engines' series, and histograms
    around the few families a poll reads."""
    reg = CollectorRegistry()
    names = ["model_name", "engine"]
    g_run = Gauge("vllm:num_requests_running", "running", names, registry=reg)
    g_wait = Gauge("vllm:num_requests_waiting", "waiting", names, registry=reg)
    g_kv = Gauge("vllm:kv_cache_usage_perc", "kv", names, registry=reg)
    c_hits = Counter("vllm:prefix_cache_hits", "hits", names, registry=reg)
    c_queries = Counter("vllm:prefix_cache_queries", "queries", names, registry=reg)
    h = Histogram("vllm:time_to_first_token_seconds", "ttft", names, registry=reg)
    Counter("vllm:prefix_cache_hits_by_tier", "a longer name that starts alike", names, registry=reg)
    for engine, share in (("0", 0.25), ("1", 0.75)):
        g_run.labels("m", engine).set(running * share)
        g_wait.labels("m", engine).set(waiting * share)
        g_kv.labels("m", engine).set(share)
        c_hits.labels("m", engine).inc(hits * share)
        c_queries.labels("m", engine).inc(2 * hits * share)
        h.labels("m", engine).observe(0.3)
    if pending is not None:
        Gauge(PENDING_PROMPT_TOKENS, "pending", registry=reg).set(pending)
    return generate_latest(reg).decode()


def test_a_poll_reads_load_and_cache_counters_from_a_full_page() -> None:
    page = read_metrics(_page(8, 4, 1000, pending=3072), EngineSample(0, 0, 0.0))
    assert page.sample == EngineSample(running=8, waiting=4, kv_usage=0.75, prompt_tokens=3072)
    assert (page.cache_hits, page.cache_queries) == (1000, 2000)


def test_a_page_without_a_family_keeps_what_the_last_poll_read() -> None:
    before = EngineSample(running=3, waiting=2, kv_usage=0.5, prompt_tokens=99)
    page = read_metrics("# a page from an engine with none of them\nother_metric 1.0\n", before)
    assert page.sample == EngineSample(3, 2, 0.5, None)     # no pending gauge: vLLM's case
    assert (page.cache_hits, page.cache_queries) == (None, None)
    assert read_metrics(_page(1, 0, 10, pending=None), before).sample.prompt_tokens is None
