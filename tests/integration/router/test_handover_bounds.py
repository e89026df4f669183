"""The router's handover against workers that answer slowly: it stays within its time bound,
keeps what the rounds before the deadline delivered (hottest first), and runs once however
often it is triggered. The workers are small aiohttp apps on loopback that speak the
simulator's export/import protocol with a chosen delay (a real simulator is never this slow)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from kvpilot.router.config import Endpoint, HandoverConfig
from kvpilot.router.handover import Handovers
from kvpilot.router.hashring import dual_ring_owners
from kvpilot.router.metrics import RouterMetrics
from kvpilot.router.policies import make_policy
from kvpilot.router.policy import PolicyContext, RequestView
from kvpilot.router.pool import Pool
from kvpilot.tokens import block_hashes, block_text

MEMBERS = frozenset({"a", "b", "c"})


class Worker:
    """Exports one stand-in block per prefix after `delays[i]` seconds on its i-th call."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.exports: list[int] = []      # prefixes asked for, per export call
        self.imported = 0
        app = web.Application()
        app.router.add_post("/kvpilot/prefixes/export", self.export)
        app.router.add_post("/kvpilot/prefixes/import", self.import_)
        self.server = TestServer(app, host="127.0.0.1")

    async def export(self, request: web.Request) -> web.Response:
        prefixes = (await request.json())["prefixes"]
        delay = self.delays[min(len(self.exports), len(self.delays) - 1)]
        self.exports.append(len(prefixes))
        await asyncio.sleep(delay)
        return web.json_response({"manifest": {str(p["key"]): [[f"pfx:{p['key']:x}", 100, 0]] for p in prefixes}})

    async def import_(self, request: web.Request) -> web.Response:
        manifest: dict[str, Any] = (await request.json())["manifest"]
        self.imported += len(manifest)
        return web.json_response({"blocks_added": len(manifest), "blocks_received": len(manifest)})


async def _setup(workers: dict[str, Worker], timeout_s: float, hot: int) -> tuple[Handovers, Pool, RouterMetrics]:
    for w in workers.values():
        await w.server.start_server()
    metrics = RouterMetrics()
    pool = Pool([Endpoint(name=n, url=str(w.server.make_url("/"))) for n, w in workers.items()],  # type: ignore[arg-type]
                make_policy("dualmap", PolicyContext(block_size=256)))
    handovers = Handovers(metrics)
    handovers.add_model("m", pool, HandoverConfig(timeout_s=timeout_s), 256)
    owners = dual_ring_owners()
    prompts = [p for p in (block_text(s, 1024) for s in range(400))
               if "a" in owners(block_hashes(p, 256)[0], MEMBERS)][:hot]
    pool.healthy()
    for i, prompt in enumerate(prompts * 2):  # twice each: all hot
        view = RequestView(f"r{i}", 1024, block_hashes(prompt, 256))
        pool.choose(view)
        handovers.observe("m", view, prompt)
    return handovers, pool, metrics


def _count(metrics: RouterMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("kvpilot_router_handovers_total",
                                              {"model": "m", "kind": "scale_in", "outcome": outcome})
    return value or 0.0


async def test_a_slow_source_is_cut_at_the_deadline_keeping_the_hottest_rounds() -> None:
    workers = {"a": Worker([0.0, 30.0]), "b": Worker([0.0]), "c": Worker([0.0])}
    handovers, pool, metrics = await _setup(workers, timeout_s=1.0, hot=12)
    async with aiohttp.ClientSession() as session:
        handovers.start(session)
        started = time.monotonic()
        pool.set_endpoints([m.endpoint for m in pool.members if m.endpoint.name != "a"])  # a leaves
        ((task, _),) = handovers._tasks.values()
        out = await task
        assert time.monotonic() - started < 3.0          # bounded: the second export never answered
        assert workers["a"].exports == [8, 4]              # two rounds of the 12 hot prefixes, 8 first
        assert out.outcome == "partial" and 8 <= out.prefixes == workers["b"].imported + workers["c"].imported
        assert _count(metrics, "partial") == 1
    for w in workers.values():
        await w.server.close()


async def test_repeated_triggers_join_the_running_handover() -> None:
    workers = {"a": Worker([0.3]), "b": Worker([0.0]), "c": Worker([0.0])}
    handovers, pool, metrics = await _setup(workers, timeout_s=5.0, hot=4)
    async with aiohttp.ClientSession() as session:
        handovers.start(session)
        url = pool.by_name["a"].url
        first = handovers._start(handovers.models["m"], "scale_in", "a", url, MEMBERS)
        pool.set_endpoints([m.endpoint for m in pool.members if m.endpoint.name != "a"])  # the file catches up
        again = handovers._start(handovers.models["m"], "scale_in", "a", url, MEMBERS)
        assert again is first
        out = await first
        assert out.outcome == "ok" and workers["a"].exports == [4]
        assert handovers._start(handovers.models["m"], "scale_in", "a", url, MEMBERS) is first  # just finished
        assert _count(metrics, "ok") == 1
    for w in workers.values():
        await w.server.close()
