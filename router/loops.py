"""What the router runs besides requests: engine-load polling (with endpoints-file polling; the
engines' own counts are how active-active replicas see each other's load, router/engine_load.py),
the router-side queues' periodic tick, Kubernetes discovery watches and KV-event listeners.
`Background.start` launches them when the app starts; `stop` ends them."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import aiohttp

from kvpilot.router.config import Endpoint
from kvpilot.router.discovery import PodWatcher
from kvpilot.router.engine_load import EngineSample, forget, observe, read_metrics
from kvpilot.router.pool import LagGate, Member, Pool
from kvpilot.router.runtime import ModelRuntime, Runtime

log = logging.getLogger("kvpilot.router")


class ScrapeFailed(Exception):
    pass


class Background:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[PodWatcher] = []

    def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        rt = self.runtime
        self._tasks.append(asyncio.create_task(self._scrape_loop()))
        self._tasks.append(asyncio.create_task(self._hold_loop()))
        for model in rt.models.values():
            kv = model.config.kv_events
            if model.kv_index is not None and kv is not None:
                self._tasks.append(asyncio.create_task(model.kv_index.listen(kv.bind)))
        loop = asyncio.get_running_loop()
        for model in rt.models.values():
            d = model.config.discovery
            if d is None:
                continue
            for role, selector in d.pools.items():
                def publish(eps: list[Endpoint], model: ModelRuntime = model, role: str = role) -> None:
                    model.discovered_pods(role, eps)

                watcher = PodWatcher(d.namespace, selector, d.port, role, publish, loop)
                watcher.start()
                self._watchers.append(watcher)

    def stop(self) -> None:
        for watcher in self._watchers:
            watcher.stop()
        for task in self._tasks:
            task.cancel()

    # -- the router-side queues' tick ----------------------------------------------------------
    async def _hold_loop(self) -> None:
        """Rebalance hot spots and release what the clock alone makes releasable (the starvation
        bound), even when no event arrives; bypass the queues while the event loop lags."""
        rt = self.runtime
        holding = [p for m in rt.models.values() for p in m.pools() if p.holder is not None]
        if not holding:
            return
        tick, threshold = rt.cfg.hold_tick_s, rt.cfg.hold_bypass_lag_s
        gate = LagGate(threshold, calm_ticks=math.ceil(1.0 / tick))   # back to holding after 1 s of calm
        while True:
            due = time.monotonic() + tick
            await asyncio.sleep(tick)
            now = time.monotonic()
            lag = now - due
            rt.metrics.loop_lag.set(lag)
            if threshold > 0 and gate.update(lag) != holding[0].bypass:
                for pool in holding:
                    pool.set_bypass(gate.on)
                rt.metrics.hold_bypassed.set(int(gate.on))
                log.log(logging.WARNING if gate.on else logging.INFO, "event loop %.0f ms late: router-side "
                        "queues %s", lag * 1000, "bypassed for new requests" if gate.on else "back in use")
            for pool in holding:
                if pool.waiting:
                    pool.pump(now)

    # -- engine metrics ------------------------------------------------------------------------
    def _poll_files(self) -> None:
        for model in self.runtime.models.values():
            doc = None if model.endpoints_file is None else model.endpoints_file.poll()
            if doc is not None:
                model.set_endpoints(doc.endpoints)
                model.scaling_events = doc.events[-50:]

    async def _scrape_loop(self) -> None:
        models = self.runtime.models.values()
        while True:
            self._poll_files()
            for model in models:
                model.timeline.members(sum(len(p.members) for p in model.pools()))
            await asyncio.gather(*(self._scrape(model, pool, m) for model in models
                                   for pool in model.pools() for m in pool.members))
            await asyncio.sleep(self.runtime.cfg.scrape_interval_s)

    async def _scrape(self, model: ModelRuntime, pool: Pool, member: Member) -> None:
        """Engine load signals (vLLM metric names) into the member's load; an unreachable
        endpoint counts as a failure, so a dead worker leaves the ring without traffic."""
        assert self.session is not None
        try:
            async with self.session.get(member.url + "/metrics") as resp:
                text = await resp.text()
            if resp.status != 200:
                raise ScrapeFailed(f"/metrics HTTP {resp.status}")
        except (TimeoutError, ScrapeFailed, aiohttp.ClientError) as e:
            forget(member.load)
            self.runtime.attempt_failed(model, pool, member, f"scrape: {e or type(e).__name__}", "-")
            return
        load = member.load
        page = read_metrics(text, EngineSample(load.engine_running, load.engine_waiting, load.kv_usage))
        if page.cache_hits is not None or page.cache_queries is not None:
            hits, queries = self.runtime.cache_counters.get(member.url, (0.0, 0.0))
            self.runtime.cache_counters[member.url] = (
                hits if page.cache_hits is None else page.cache_hits,
                queries if page.cache_queries is None else page.cache_queries)
        if page.block_size is not None:
            load.kv_block_size = page.block_size
        # Other router replicas' share there, against this replica's own requests now.
        observe(load, page.sample)
