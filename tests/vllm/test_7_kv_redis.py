"""kvpilot's vLLM KV connector between two real engines over two real Redis shards.

Both engines run `KvpilotRedisConnector` (kv_both) against the same two Redis servers, so any
block one computes the other can load. In file order: P/D through the router (decode loads the
prompt the prefill engine saved), live migration by resume (the target loads every full block,
including the ones the source saved while decoding), the router's scale-event handover (the
inheriting engine warmed from the store), one shard lost (misses only), Redis killed under load
(every request completes with the same tokens; the failures are counted), and a handover with
Redis down (counted failed)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from vllm_stage import Stages, make_prompt, post_json

from kvpilot.operator import render_pool
from kvpilot.router.config import Endpoint
from kvpilot.router.endpoints_file import EndpointsDoc, write_endpoints
from kvpilot.router.handover import RECENT_S
from kvpilot.testing.redis import RedisServer
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.vllm import BLOCK_SIZE, SERVED, VLLMServer, kvpilot_overlay, metric

BLOCK_BYTES = 2 * 2 * BLOCK_SIZE * 2 * 32 * 4      # layers × kv heads × tokens × (K|V) × head dim × fp32
EXTERNAL = {"source": "external_kv_transfer"}
LOCAL = {"source": "local_compute"}


def kv_config(urls: str) -> str:
    """Exactly what the operator renders for `kvTransfer.backend: redis` (here with two shards)."""
    return json.dumps(render_pool.redis_kv_transfer_config(urls), separators=(",", ":"))


class KVPair:
    def __init__(self, workdir: Path) -> None:
        self.shards = [RedisServer(workdir / f"redis-{i}") for i in range(2)]
        for s in self.shards:  # the documented production setting: bounded, least recently used goes first
            r = redis.Redis(host=s.host, port=s.port)
            r.config_set("maxmemory", "256mb")
            r.config_set("maxmemory-policy", "allkeys-lru")
        urls = ",".join(s.url for s in self.shards)
        env = {"PYTHONPATH": str(kvpilot_overlay())}
        self.x = VLLMServer.tiny(name="kv-x", workdir=workdir, cpu=0, env=env, wait=False,
                                 extra=["--kv-transfer-config", kv_config(urls)])
        self.y = VLLMServer.tiny(name="kv-y", workdir=workdir, cpu=1, env=env, wait=False,
                                 extra=["--kv-transfer-config", kv_config(urls)])
        self.x.wait()
        self.y.wait()

    def keys(self, shard: int) -> list[bytes]:
        s = self.shards[shard]
        return list(redis.Redis(host=s.host, port=s.port).scan_iter(match="kvp:vllm:*", count=1000))

    def total_keys(self) -> int:
        return sum(len(self.keys(i)) for i in range(2) if self.shards[i].proc.alive())

    def stop(self) -> None:
        for server in (self.x, self.y):
            server.stop()
        for s in self.shards:
            s.stop()


@pytest.fixture(scope="module")
def kv(vllm_stages: Stages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KVPair]:
    vllm_stages.stop()  # two engines at a time on this machine
    pair = KVPair(tmp_path_factory.mktemp("kv-redis"))
    try:
        yield pair
    finally:
        pair.stop()


def greedy(prompt: str | list[int], max_tokens: int = 16) -> dict[str, Any]:
    return {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}


def wait_keys(kv: KVPair, at_least: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while kv.total_keys() < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kv.total_keys() >= at_least, (kv.total_keys(), at_least)


def test_pd_over_redis_decode_loads_the_prompt_and_answers_as_aggregated(
        kv: KVPair, router_factory: Callable[..., RouterProcess]) -> None:
    router = router_factory([{"name": SERVED, "policy": "round-robin", "mode": "disaggregated", "endpoints": [
        {"name": "kv-x", "url": kv.x.url, "role": "prefill"}, {"name": "kv-y", "url": kv.y.url, "role": "decode"}]}])
    prompt = make_prompt("kv-pd", 4 * BLOCK_SIZE + 40)
    moved, computed = kv.y.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL), \
        kv.y.metric("vllm:prompt_tokens_by_source_total", **LOCAL)
    out, headers = post_json(router.url + "/v1/completions", greedy(prompt))
    assert headers["X-Kvpilot-Endpoint"] == "kv-y"
    transferred = kv.y.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL) - moved
    local = kv.y.metric("vllm:prompt_tokens_by_source_total", **LOCAL) - computed
    # Decode took every full prompt block from Redis and computed only the partial tail.
    assert transferred == 4 * BLOCK_SIZE and local == out["usage"]["prompt_tokens"] - transferred, (transferred, local)
    assert kv.y.metric("vllm:kvpilot_kv_loaded_blocks_total") >= 4
    # The aggregated run (the prefill engine, start to end) gives the same greedy tokens.
    agg = kv.x.post("/v1/completions", greedy(prompt))["choices"][0]
    assert out["choices"][0]["token_ids"] == agg["token_ids"] and out["choices"][0]["text"] == agg["text"]
    # The bytes are in Redis: whole blocks (all layers, plus the store's 16-byte header).
    keys = kv.keys(0) + kv.keys(1)
    assert len(keys) >= 4
    sizes = {redis.Redis(host=s.host, port=s.port).strlen(k) for s in kv.shards for k in kv.keys(kv.shards.index(s))}
    assert sizes == {BLOCK_BYTES + 16}, sizes


@pytest.mark.parametrize("mode", ["cut-at-once", "aligned"])
def test_migrated_stream_loads_its_blocks_on_the_target(
        mode: str, kv: KVPair, router_factory: Callable[..., RouterProcess]) -> None:
    """Cut at once, the target computes the tail after the last full block (up to a block); with an
    aligned cut (router/resume_cut.py, the engines' block size read from their /metrics) the router
    waits for the stream to pass a block boundary and the target computes slack + 1 tokens."""
    slack = 1
    migration = {"alignCutTokens": 0} if mode == "cut-at-once" else {"cutSlackTokens": slack}
    router = router_factory([{"name": SERVED, "policy": "round-robin", "engine": "vllm", "migration": migration,
                              "endpoints": [{"name": "kv-x", "url": kv.x.url}, {"name": "kv-y", "url": kv.y.url}]}])
    servers = {"kv-x": kv.x, "kv-y": kv.y}
    other = {"kv-x": "kv-y", "kv-y": "kv-x"}
    body = greedy(make_prompt(f"kv-migrate-{mode}", 300), 400)
    before = {n: (s.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL),
                  s.metric("vllm:prompt_tokens_by_source_total", **LOCAL)) for n, s in servers.items()}
    results: list[dict[str, Any]] = []
    rid = f"kv-mig-{mode}"

    def move(source: str) -> None:
        results.append(post_json(router.admin_url + "/kvpilot/migrate", {"request_id": rid,
                                                                   "target": other[source]})[0])

    from test_2_resume import _stream  # the same client as the resume test: cut after 40 chunks

    payloads, source = _stream(router.url, body, rid, move)
    result = results[0]
    assert result["outcome"] == "migrated" and result["mode"] == "resume", result
    target, cut = other[source], result["resumed_tokens"]
    got = [t for p in payloads for c in p["choices"] for t in c["token_ids"]]
    prompt_ids = next(c["prompt_token_ids"] for p in payloads for c in p["choices"] if c.get("prompt_token_ids"))
    # The unmigrated run on the source (its prefix cache is warm; greedy, so the same tokens).
    base = servers[source].post("/v1/completions", body)["choices"][0]
    assert got == base["token_ids"]
    # The target loaded every full block of prompt + generated from Redis (the source saved the
    # decoded ones as they filled) and computed the rest.
    loaded = servers[target].metric("vllm:prompt_tokens_by_source_total", **EXTERNAL) - before[target][0]
    computed = servers[target].metric("vllm:prompt_tokens_by_source_total", **LOCAL) - before[target][1]
    resumed = len(prompt_ids) + cut
    assert loaded == (resumed - 1) // BLOCK_SIZE * BLOCK_SIZE and loaded + computed == resumed, \
        (loaded, computed, resumed)
    assert result["blocking_ms"] > 0
    if mode == "cut-at-once":
        assert computed <= BLOCK_SIZE and result["cut_wait_tokens"] == 0 and result["target_tail_tokens"] is None
    else:
        # ~340 tokens at the ask: the cut waited for 3 blocks + 2 (and the stream went on meanwhile).
        assert computed <= slack + 1 and computed == result["target_tail_tokens"], (computed, result)
        assert 0 < result["cut_wait_tokens"] < BLOCK_SIZE, result


def _publish(path: Path, *names: str, kv: KVPair) -> None:
    """Replace the router's endpoints file atomically, as local mode does: these engines are the pool
    now. (Rewritten in place, the router once read it empty between truncate and write: every pod
    left, and a spurious scale-in was counted.)"""
    servers = {"kv-x": kv.x, "kv-y": kv.y}
    write_endpoints(path, EndpointsDoc(endpoints=[Endpoint(name=n, url=servers[n].url) for n in names]))


def _sources(server: VLLMServer) -> dict[str, float]:
    return {k: server.metric("vllm:prompt_tokens_by_source_total", source=k)
            for k in ("external_kv_transfer", "local_cache_hit", "local_compute")}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def _hot(router: RouterProcess, tag: str, n: int) -> list[dict[str, Any]]:
    """`n` prompts of 6+ blocks, each sent twice through the router (hot: `minHits` 2)."""
    bodies = [greedy(make_prompt(f"{tag}-{i}", 6 * BLOCK_SIZE + 50), 2) for i in range(n)]
    for b in bodies + bodies:
        post_json(router.url + "/v1/completions", b)
    return bodies


def _router_metric(router: RouterProcess, name: str, **labels: str) -> float:
    return metric(router.metrics_text(), name, **labels)


def test_scale_events_warm_the_inheriting_engine_from_redis(
        kv: KVPair, router_factory: Callable[..., RouterProcess], tmp_path: Path) -> None:
    eps = tmp_path / "endpoints.yaml"
    _publish(eps, "kv-x", kv=kv)
    router = router_factory([{"name": SERVED, "policy": "dualmap", "engine": "vllm", "endpointsFile": str(eps),
                              "kvTransfer": {"backend": "redis"}}])
    start = kv.total_keys()
    hot = _hot(router, "kv-out", 2)               # computed on kv-x, which saves every full block
    wait_keys(kv, start + 2 * 6)
    # Scale-out: kv-y is pre-warmed before it is published (local mode's order).
    before = _sources(kv.y)
    out, _ = post_json(router.admin_url + "/kvpilot/handover", {"model": SERVED, "joining": "kv-y", "url": kv.y.url})
    warmed = _delta(_sources(kv.y), before)
    assert out["outcome"] == "ok" and out["prefixes"] == 2, out
    # What the router counts as loaded is what kv-y's engine took from Redis: whole blocks, ≥ 4 per prefix.
    assert out["tokens"] == warmed["external_kv_transfer"] >= 2 * 4 * BLOCK_SIZE and out["tokens"] % BLOCK_SIZE == 0
    assert warmed["local_compute"] < 2 * 2 * BLOCK_SIZE     # at most the cut block and the last token each
    # kv-y now serves a hot prompt from its own prefix cache.
    before = _sources(kv.y)
    assert kv.y.post("/v1/completions", hot[0])["choices"][0]["token_ids"] == \
        kv.x.post("/v1/completions", hot[0])["choices"][0]["token_ids"]
    served = _delta(_sources(kv.y), before)
    assert served["local_cache_hit"] >= 4 * BLOCK_SIZE and served["local_compute"] < BLOCK_SIZE, served

    # Scale-in: new hot prefixes on kv-x, then kv-x leaves the pool (replaced by kv-y): the router
    # warms kv-y, which inherits every key, from the store (kv-x is not asked for anything).
    hot = _hot(router, "kv-in", 2)
    wait_keys(kv, start + 4 * 6)
    before, tokens = _sources(kv.y), _router_metric(router, "kvpilot_router_handover_tokens_total")
    _publish(eps, "kv-y", kv=kv)
    deadline = time.monotonic() + 60
    while not _router_metric(router, "kvpilot_router_handovers_total", kind="scale_in") and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert _router_metric(router, "kvpilot_router_handovers_total", kind="scale_in", outcome="ok") == 1, \
        [x for x in router.metrics_text().splitlines() if x.startswith("kvpilot_router_handover")]
    # All four hot prefixes fell to kv-y: two it held already, two loaded now.
    assert _router_metric(router, "kvpilot_router_handover_prefixes_total", kind="scale_in") == 4
    loaded = _router_metric(router, "kvpilot_router_handover_tokens_total") - tokens
    assert loaded == _delta(_sources(kv.y), before)["external_kv_transfer"] >= 2 * 4 * BLOCK_SIZE
    before = _sources(kv.y)
    _, headers = post_json(router.url + "/v1/completions", hot[1])
    assert headers["X-Kvpilot-Endpoint"] == "kv-y"
    assert _delta(_sources(kv.y), before)["local_cache_hit"] >= 4 * BLOCK_SIZE

    # Scale-in of a 2-pod pool: kv-y is already every key's second candidate, but it has not
    # served the prefixes DualMap kept on kv-x; the router warms it with exactly those.
    scaled_in = time.monotonic()
    _publish(eps, "kv-y", "kv-x", kv=kv)
    _wait_members(router, 2)
    served: dict[int, set[str]] = {}
    bodies = [greedy(make_prompt(f"kv-pair-{i}", 6 * BLOCK_SIZE + 50), 2) for i in range(4)]
    for i, b in enumerate(bodies + bodies):
        served.setdefault(i % len(bodies), set()).add(post_json(router.url + "/v1/completions", b)[1]
                                                      ["X-Kvpilot-Endpoint"])
    only_x = sum(1 for pods in served.values() if pods == {"kv-x"})
    wait_keys(kv, start + 8 * 6)
    before, tokens = _sources(kv.y), _router_metric(router, "kvpilot_router_handover_tokens_total")
    prefixes = _router_metric(router, "kvpilot_router_handover_prefixes_total", kind="scale_in")
    time.sleep(max(0.0, RECENT_S + 1 - (time.monotonic() - scaled_in)))  # a trigger sooner joins the last one
    _publish(eps, "kv-y", kv=kv)
    deadline = time.monotonic() + 60
    while _router_metric(router, "kvpilot_router_handovers_total", kind="scale_in") < 2 and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    outcome = "ok" if only_x else "noop"
    assert _router_metric(router, "kvpilot_router_handovers_total", kind="scale_in", outcome=outcome) == \
        (2 if only_x else 1), (served, [x for x in router.metrics_text().splitlines()
                                        if x.startswith("kvpilot_router_handover")])
    assert _router_metric(router, "kvpilot_router_handover_prefixes_total", kind="scale_in") - prefixes == only_x
    loaded = _router_metric(router, "kvpilot_router_handover_tokens_total") - tokens
    assert loaded == _delta(_sources(kv.y), before)["external_kv_transfer"] >= only_x * 4 * BLOCK_SIZE


def _wait_members(router: RouterProcess, n: int) -> None:
    """Until the router's pool has `n` members (it polls the endpoints file)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _router_metric(router, "kvpilot_router_healthy_endpoints") >= n:
            return
        time.sleep(0.2)


def _run_on(server: VLLMServer, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: server.post("/v1/completions", b)["choices"][0], bodies))


def test_one_shard_lost_means_misses_only(kv: KVPair) -> None:
    bodies = [greedy(make_prompt(f"kv-shard-{i}", 7 * BLOCK_SIZE + 20)) for i in range(3)]
    start = kv.total_keys()
    ref = [kv.x.post("/v1/completions", b)["choices"][0] for b in bodies]
    wait_keys(kv, start + 21)
    assert len(kv.keys(0)) >= 5 and len(kv.keys(1)) >= 5  # blocks spread over both shards
    on_first = len(kv.keys(0))
    kv.shards[1].stop()
    failed = kv.y.metric("vllm:kvpilot_kv_failed_loads_total")
    moved = kv.y.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL)
    got = _run_on(kv.y, bodies)
    assert [g["token_ids"] for g in got] == [r["token_ids"] for r in ref]
    loaded = kv.y.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL) - moved
    # Only the leading blocks that sit on the live shard came from Redis; nothing failed to load.
    assert 0 <= loaded <= on_first * BLOCK_SIZE and loaded % BLOCK_SIZE == 0
    assert kv.y.metric("vllm:kvpilot_kv_failed_loads_total") == failed


def test_redis_killed_mid_transfer_every_request_completes_and_is_counted(kv: KVPair) -> None:
    bodies = [greedy(make_prompt(f"kv-kill-{i}", 2 * BLOCK_SIZE + 60), 200) for i in range(4)]
    ref = [kv.x.post("/v1/completions", b)["choices"][0] for b in bodies]
    failed = kv.y.metric("vllm:kvpilot_kv_num_failed_transfers_total")
    killer = threading.Timer(0.3, kv.shards[0].stop)  # while Y loads and decodes (and saves) the four
    killer.start()
    try:
        got = _run_on(kv.y, bodies)
    finally:
        killer.join()
    assert [g["token_ids"] for g in got] == [r["token_ids"] for r in ref]
    # With no store at all: served by recomputing, same tokens.
    after = kv.y.post("/v1/completions", bodies[0])["choices"][0]
    assert after["token_ids"] == ref[0]["token_ids"]
    deadline = time.monotonic() + 15  # vLLM publishes connector stats with its periodic logging
    while kv.y.metric("vllm:kvpilot_kv_num_failed_transfers_total") <= failed and time.monotonic() < deadline:
        time.sleep(0.5)
    assert kv.y.metric("vllm:kvpilot_kv_num_failed_transfers_total") > failed


def test_handover_with_redis_down_is_counted_failed_and_clients_are_served(
        kv: KVPair, router_factory: Callable[..., RouterProcess], tmp_path: Path) -> None:
    assert not any(s.proc.alive() for s in kv.shards)  # both shards were stopped above
    eps = tmp_path / "endpoints.yaml"
    _publish(eps, "kv-x", kv=kv)
    router = router_factory([{"name": SERVED, "policy": "dualmap", "engine": "vllm", "endpointsFile": str(eps),
                              "kvTransfer": {"backend": "redis"}}])
    _hot(router, "kv-down", 1)                    # served: computed, nothing saved
    out, _ = post_json(router.admin_url + "/kvpilot/handover", {"model": SERVED, "joining": "kv-y", "url": kv.y.url})
    assert (out["outcome"], out["prefixes"], out["tokens"]) == ("failed", 0, 0), out
    assert _router_metric(router, "kvpilot_router_handovers_total", kind="scale_out", outcome="failed") == 1
