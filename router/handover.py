"""Scale events, router side: move hot prefixes' KV to the pods that inherit their ring keys.

When a pod leaves the cache-affinity pool, its keys fall to ring successors that start cold;
when a pod joins, it takes over keys it has never served. Either way the next requests of the
hottest prefixes recompute their prefill exactly while capacity changes. The router knows which
prefixes are hot (`HotPrefixes`) and the rings, so on a membership change it plans the moves
(`moves_in` / `moves_out`) and asks the pods to hand the KV over through the KV store:
`POST {source}/kvpilot/prefixes/export`, then `POST {target}/kvpilot/prefixes/import`
(`kvpilot.sim.handover`). After an import the router's shadow cache of the target learns the
prefix, so its next request goes there.

Triggers: any membership change of the pool (endpoints file, Kubernetes discovery: a pod that
left the ready set is asked to export while its grace period keeps it running), and
`POST /kvpilot/handover {"model", "leaving" | "joining": name, "url"?}`, which answers when the
handover is done — local mode calls it before it stops a retired worker and before it publishes
a new one. One handover per (model, kind, pod) runs at a time; a trigger that finds one running
or just finished joins it instead of starting another.

Guarantees: a handover runs in the background of request routing and never blocks it; it is
bounded by `timeoutSeconds`; any failure (pod gone, store down, timeout) only means the target
recomputes, as without handover, and is counted in `kvpilot_router_handovers_total{outcome}`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from kvpilot.kvtransfer.scaling import Owners, dual_ring_owners
from kvpilot.router.config import HandoverConfig
from kvpilot.router.hot_prefixes import Hot, HotPrefixes, moves_in, moves_out
from kvpilot.router.metrics import RouterMetrics
from kvpilot.router.policies.dualmap import DualMap, affinity_key
from kvpilot.router.policy import InstanceLoad, RequestView
from kvpilot.router.pool import Member, Pool

log = logging.getLogger("kvpilot.router.handover")
RECENT_S = 30.0  # a finished handover answers repeated triggers for this long


@dataclass(slots=True)
class Outcome:
    outcome: str              # ok | partial | failed | noop | unsupported
    prefixes: int = 0         # prefixes now in a target's cache
    bytes: int = 0
    detail: str = ""

    def body(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "prefixes": self.prefixes, "bytes": self.bytes, "detail": self.detail}


@dataclass(slots=True)
class _Model:
    name: str
    pool: Pool
    policy: DualMap
    cfg: HandoverConfig
    tracker: HotPrefixes
    owners: Owners
    gone: dict[str, str] = field(default_factory=dict)   # recently left pod → its URL


class _Failed(Exception):
    pass


class _Unsupported(Exception):
    """The pod has no KV store to hand over through (HTTP 409): not a failure, nothing to do."""


class Handovers:
    def __init__(self, metrics: RouterMetrics) -> None:
        r = metrics.registry
        self.total = Counter("kvpilot_router_handovers", "Scale-event KV handovers by kind (scale_in, scale_out) "
                             "and outcome (ok, partial, failed, noop, unsupported).", ["model", "kind", "outcome"],
                             registry=r)
        self.moved = Counter("kvpilot_router_handover_prefixes", "Hot prefixes put in a pod's cache by handovers.",
                             ["model", "kind"], registry=r)
        self.moved_bytes = Counter("kvpilot_router_handover_bytes", "KV bytes imported by handovers.",
                                   ["model", "kind"], registry=r)
        self.models: dict[str, _Model] = {}
        self.session: aiohttp.ClientSession | None = None
        self._tasks: dict[tuple[str, str, str], tuple[asyncio.Task[Outcome], float]] = {}

    def add_model(self, name: str, pool: Pool, cfg: HandoverConfig) -> None:
        """Hand over for the pool whose policy keeps the cache affinity (DualMap's rings)."""
        if not cfg.enabled or not isinstance(pool.policy, DualMap):
            return
        m = _Model(name, pool, pool.policy, cfg,
                   HotPrefixes(pool.policy.context.block_size, window=cfg.window, min_hits=cfg.min_hits,
                               max_blocks=cfg.max_blocks), dual_ring_owners())
        self.models[name] = m
        pool.on_change = functools.partial(self._changed, m)

    def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    def observe(self, model: str, view: RequestView, prompt: str) -> None:
        m = self.models.get(model)
        if m is None or not view.block_hashes:
            return
        p, hashes = m.policy, view.block_hashes
        if p.adaptive is not None:
            key, depth = p.adaptive.peek(hashes)
        else:
            key, depth = affinity_key(view, p.depth), min(p.depth, len(hashes))
        m.tracker.observe(key, depth, hashes, prompt)

    # -- triggers -------------------------------------------------------------------------------
    def _changed(self, m: _Model, joined: list[Member], left: list[Member]) -> None:
        if self.session is None:
            return  # the initial endpoint list, before serving: nothing is hot yet
        names = frozenset(x.endpoint.name for x in m.pool.healthy())
        for x in left:
            m.gone[x.endpoint.name] = x.url
            self._start(m, "scale_in", x.endpoint.name, x.url, names | {x.endpoint.name})
        for x in joined:
            self._start(m, "scale_out", x.endpoint.name, x.url, names)

    def _start(self, m: _Model, kind: str, pod: str, url: str, members: frozenset[str]) -> asyncio.Task[Outcome]:
        now = time.monotonic()
        for k, (task, at) in list(self._tasks.items()):
            if task.done() and now - at > RECENT_S:
                del self._tasks[k]
        entry = self._tasks.get((m.name, kind, pod))
        if entry is not None:
            return entry[0]
        task = asyncio.get_running_loop().create_task(self._run(m, kind, pod, url, members))
        task.add_done_callback(lambda _t: self._tasks.update({(m.name, kind, pod): (task, time.monotonic())}))
        self._tasks[(m.name, kind, pod)] = (task, now)
        return task

    async def handle(self, request: web.Request) -> web.Response:
        """`POST /kvpilot/handover {"model", "leaving" | "joining": pod, "url"?}`: answers when done."""
        try:
            body = await request.json()
            m = self.models[str(body["model"])]
            kind, pod = ("scale_in", str(body["leaving"])) if "leaving" in body else ("scale_out", str(body["joining"]))
        except KeyError:
            return web.json_response({"error": "model (handing over) and leaving or joining required"}, status=404)
        except (ValueError, TypeError, AttributeError):
            return web.json_response({"error": "body must be JSON"}, status=400)
        member = m.pool.by_name.get(pod)
        url = str(body.get("url") or (member.url if member else m.gone.get(pod, ""))).rstrip("/")
        if not url:
            return web.json_response({"error": f"unknown pod {pod!r}: give its url"}, status=404)
        names = frozenset(x.endpoint.name for x in m.pool.healthy())
        members = names | {pod} if kind == "scale_in" else names - {pod}
        outcome = await asyncio.shield(self._start(m, kind, pod, url, members))
        return web.json_response(outcome.body())

    # -- the moves ---------------------------------------------------------------------------------
    async def _run(self, m: _Model, kind: str, pod: str, url: str, members: frozenset[str]) -> Outcome:
        started = time.monotonic()
        try:
            async with asyncio.timeout(m.cfg.timeout_s):
                if kind == "scale_in":
                    out = await self._scale_in(m, pod, url, members)
                else:
                    out = await self._scale_out(m, pod, url, members)
        except _Unsupported as e:
            out = Outcome("unsupported", detail=str(e))
        except (TimeoutError, aiohttp.ClientError, _Failed, ValueError) as e:
            out = Outcome("failed", detail=str(e) or type(e).__name__)
        self.total.labels(m.name, kind, out.outcome).inc()
        self.moved.labels(m.name, kind).inc(out.prefixes)
        self.moved_bytes.labels(m.name, kind).inc(out.bytes)
        log.info("handover %s %s: %s", kind, pod, out.outcome,
                 extra={"model": m.name, "prefixes": out.prefixes, "bytes": out.bytes, "detail": out.detail,
                        "seconds": round(time.monotonic() - started, 3)})
        return out

    async def _scale_in(self, m: _Model, leaving: str, url: str, members: frozenset[str]) -> Outcome:
        plan = moves_in(m.tracker.hot(m.cfg.max_prefixes), leaving, members, m.owners)
        if not plan:
            return Outcome("noop", detail="no hot prefix changes owner")
        prefixes = list({h.key: h for hs in plan.values() for h in hs}.values())
        manifest = await self._export(url, prefixes)
        return await self._deliver(m, plan, manifest, {})

    async def _scale_out(self, m: _Model, joining: str, url: str, members: frozenset[str]) -> Outcome:
        caches = m.policy.estimate.caches

        def held(pod: str, h: Hot) -> int:
            return caches[pod].match(list(h.hashes)) if pod in caches else 0

        plan = moves_out(m.tracker.hot(m.cfg.max_prefixes), joining, members, m.owners, held)
        if not plan:
            return Outcome("noop", detail="the new pod owns no hot prefix")
        sources = [s for s in plan if s in m.pool.by_name]
        got = await asyncio.gather(*(self._export(m.pool.by_name[s].url, plan[s]) for s in sources),
                                   return_exceptions=True)
        manifest: dict[str, Any] = {}
        for part in got:
            if isinstance(part, dict):
                manifest.update(part)
        if not manifest and got and all(isinstance(part, _Unsupported) for part in got):
            raise _Unsupported("no source has a KV store")
        if not manifest and any(isinstance(part, BaseException) for part in got):
            raise _Failed("; ".join(str(p) or type(p).__name__ for p in got if isinstance(p, BaseException)))
        return await self._deliver(m, {joining: [h for s in sources for h in plan[s]]}, manifest, {joining: url})

    async def _export(self, url: str, prefixes: list[Hot]) -> dict[str, Any]:
        assert self.session is not None
        body = {"prefixes": [{"key": h.key, "text": h.text, "hits": h.hits} for h in prefixes]}
        async with self.session.post(url + "/kvpilot/prefixes/export", json=body) as resp:
            if resp.status == 409:
                raise _Unsupported(f"{url} has no KV store")
            if resp.status != 200:
                raise _Failed(f"export from {url}: HTTP {resp.status} {(await resp.text())[:200]}")
            manifest: dict[str, Any] = (await resp.json())["manifest"]
            return manifest

    async def _deliver(self, m: _Model, plan: dict[str, list[Hot]], manifest: dict[str, Any],
                       urls: dict[str, str]) -> Outcome:
        """Each target imports its part of the manifest; its shadow cache learns what arrived."""
        assert self.session is not None
        jobs = []
        for pod, hot in plan.items():
            part = {str(h.key): manifest[str(h.key)] for h in hot if str(h.key) in manifest}
            url = urls.get(pod) or (m.pool.by_name[pod].url if pod in m.pool.by_name else "")
            if part and url:
                jobs.append((pod, url, [h for h in hot if str(h.key) in part], part))
        if not jobs:
            return Outcome("noop", detail="the source no longer caches the hot prefixes")
        results = await asyncio.gather(*(self._import(url, part) for _, url, _, part in jobs), return_exceptions=True)
        out = Outcome("ok")
        failed = []
        for (pod, _, hot, part), res in zip(jobs, results, strict=True):
            blocks = {d[0]: int(d[1]) for descs in part.values() for d in descs}
            if isinstance(res, BaseException) or res < len(blocks):
                failed.append(f"{pod}: {res if isinstance(res, BaseException) else f'{res}/{len(blocks)} blocks'}")
                continue
            out.prefixes += len(hot)
            out.bytes += sum(blocks.values())
            m.policy.estimate.track([InstanceLoad(pod)])
            for h in hot:
                m.policy.estimate.caches[pod].insert(list(h.hashes))
        if failed:
            out.outcome, out.detail = ("partial" if out.prefixes else "failed"), "; ".join(failed)
        return out

    async def _import(self, url: str, manifest: dict[str, Any]) -> int:
        assert self.session is not None
        async with self.session.post(url + "/kvpilot/prefixes/import", json={"manifest": manifest}) as resp:
            if resp.status != 200:
                raise _Failed(f"HTTP {resp.status}")
            return int((await resp.json())["blocks_received"])
