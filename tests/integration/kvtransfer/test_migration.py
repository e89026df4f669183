"""Live migration of a running streaming request between real simulator processes, through real
Redis and the real router: the client's stream must equal the unmigrated one, token by token."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from kvpilot.testing.redis import RedisServer
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text

Workers = Callable[..., SimWorker]
Routers = Callable[..., RouterProcess]
PROMPT = block_text(77, 2000)
MAX_TOKENS = 800


def _pair(sim_worker_factory: Workers, redis_url: str) -> list[SimWorker]:
    # 0.5× real time: ~5 ms per token on the small model, so the stream outlives the migration.
    flags = ("--profile", "h100-qwen2.5-0.5b", "--kv-store", redis_url, "--time-scale", "0.5")
    return [sim_worker_factory(*flags), sim_worker_factory(*flags)]


def _router(router_factory: Routers, workers: list[SimWorker]) -> RouterProcess:
    eps = [{"name": f"w{w.port}", "url": w.url} for w in workers]
    return router_factory([{"name": "sim-model", "policy": "round-robin", "endpoints": eps, "migration": {}}],
                          scrapeIntervalSeconds=30)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _migrate(router: RouterProcess, rid: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"request_id": rid, **extra}).encode()
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(router.admin_url + "/kvpilot/migrate", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stream(router: RouterProcess, rid: str, during: Callable[[], None] | None = None,
            after_chunks: int = 25) -> tuple[list[str], int]:
    """The client's words, one per token, and the chunk count; `during` runs on a thread once
    `after_chunks` chunks have arrived, while the client keeps reading."""
    words: list[str] = []
    chunks = 0
    thread: threading.Thread | None = None
    for chunk in router.openai_client().completions.create(model="sim-model", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                           stream=True, extra_headers={"X-Request-Id": rid}):
        chunks += 1
        for choice in chunk.choices:
            words.extend(choice.text.split())
        if during is not None and chunks == after_chunks:
            thread = threading.Thread(target=during)
            thread.start()
    if thread is not None:
        thread.join()
    return words, chunks


def test_migrated_stream_equals_the_unmigrated_one(redis_server: RedisServer, sim_worker_factory: Workers,
                                                   router_factory: Routers) -> None:
    workers = _pair(sim_worker_factory, redis_server.url)
    router = _router(router_factory, workers)
    baseline, _ = _stream(router, "base-1")
    assert len(baseline) == MAX_TOKENS

    results: list[tuple[int, dict[str, Any]]] = []
    migrated, _ = _stream(router, "mig-1", lambda: results.append(_migrate(router, "mig-1")))
    (status, result), = results
    assert status == 200 and result["outcome"] == "migrated", result
    assert 0 < result["tokens_at_stop"] < MAX_TOKENS and result["rounds"] >= 1
    assert result["bytes"] >= 2000 * 12 * 1024  # the whole context went through Redis
    assert migrated == baseline  # token by token: nothing missing, nothing repeated
    # Both instances generated part of it; the router counted the migration.
    gen = [_metric(w.metrics_text(), "vllm:generation_tokens_total") for w in workers]
    assert min(gen) > 0 and sum(gen) == 2 * MAX_TOKENS
    assert _metric(router.metrics_text(), "kvpilot_router_migrations_total", outcome="migrated") == 1
    source = next(w for w in workers if f"w{w.port}" == result["source"])
    assert _metric(source.metrics_text(), "kvpilot:migrations_total", role="source", outcome="migrated") == 1
    # The target dropped the migration's blocks from Redis once it had them.
    r = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 5
    while r.keys("kvp:mig:blk:*") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.keys("kvp:mig:blk:*") == []


def test_redis_killed_mid_migration_leaves_the_request_on_the_source(
        tmp_path: Path, sim_worker_factory: Workers, router_factory: Routers) -> None:
    server = RedisServer(tmp_path / "redis")
    workers = _pair(sim_worker_factory, server.url)
    router = _router(router_factory, workers)
    baseline, _ = _stream(router, "base-2")
    results: list[tuple[int, dict[str, Any]]] = []

    def migrate_then_kill_redis() -> None:
        # Rounds spaced by 1 s so that Redis dies while the copy is under way.
        t = threading.Thread(target=lambda: results.append(_migrate(router, "mig-2", round_delay_s=1.0)))
        t.start()
        time.sleep(0.3)
        server.stop()
        t.join()

    out, _ = _stream(router, "mig-2", migrate_then_kill_redis)
    (status, result), = results
    assert status == 409 and result["outcome"] == "aborted", result
    assert out == baseline  # the request completed on the source, stream intact
    source = next(w for w in workers if f"w{w.port}" == result["source"])
    text = source.metrics_text()
    assert _metric(text, "kvpilot:migrations_total", role="source", outcome="aborted") == 1
    # One failed transfer: the source's write or, when Redis died between a write and its read, the
    # target's pull (which the source then hears as a refusal). Which one depends on timing.
    assert sum(_metric(w.metrics_text(), "vllm:nixl_num_failed_transfers_total") for w in workers) == 1
    assert _metric(router.metrics_text(), "kvpilot_router_migrations_total", outcome="aborted") == 1


def test_migrating_an_unknown_request_is_a_404(redis_server: RedisServer, sim_worker_factory: Workers,
                                                           router_factory: Routers) -> None:
    router = _router(router_factory, _pair(sim_worker_factory, redis_server.url))
    status, result = _migrate(router, "nobody")
    assert status == 404 and result["outcome"] == "not_found"


def test_the_router_migrates_on_its_own_when_an_instance_runs_over_theta_slo(
        redis_server: RedisServer, sim_worker_factory: Workers, router_factory: Routers) -> None:
    workers = _pair(sim_worker_factory, redis_server.url)
    expected = []
    for chunk in workers[0].openai_client().completions.create(model="sim-model", prompt=PROMPT,
                                                               max_tokens=MAX_TOKENS, stream=True):
        for choice in chunk.choices:
            expected.extend(choice.text.split())
    eps = [{"name": f"w{w.port}", "url": w.url} for w in workers]
    # A 1 ms TPOT SLO: any instance streaming is a hot spot, an idle one is cool.
    migration = {"enabled": True, "tpotMs": 1, "theta": 0.8, "intervalSeconds": 0.5}
    router = router_factory([{"name": "sim-model", "policy": "round-robin", "endpoints": eps,
                              "migration": migration}], scrapeIntervalSeconds=30)
    out, _ = _stream(router, "auto-1")
    assert out == expected
    assert _metric(router.metrics_text(), "kvpilot_router_migrations_total", outcome="migrated") >= 1
