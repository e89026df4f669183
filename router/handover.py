"""Scale events, router side: move hot prefixes' KV to the pods that inherit their ring keys.

When a pod leaves the cache-affinity pool, its keys fall to ring successors that start cold;
when a pod joins, it takes over keys it has never served. Either way the next requests of the
hottest prefixes recompute their prefill exactly while capacity changes. The router knows which
prefixes are hot (`HotPrefixes`) and the rings, so on a membership change it plans the moves
(`moves_in` / `moves_out`) and asks the pods to hand the KV over through the KV store:
`POST {source}/kvpilot/prefixes/export`, then `POST {target}/kvpilot/prefixes/import`
(`kvpilot.sim.handover`). After an import the router's shadow cache of the target learns the
prefix, so its next request goes there. vLLM engines have no such endpoints; when they share
kvpilot's Redis store (`kvTransfer: {backend: redis}`, `ModelConfig.shared_store`) every prefix
is in the store already, and the target is warmed instead: each hot prefix is sent to it as a
1-token completion that loads the stored blocks into its prefix cache (`kvpilot.router.prewarm`).

Triggers: any membership change of the pool (endpoints file, Kubernetes discovery: a pod that
left the ready set is asked to export while its grace period keeps it running), and
`POST /kvpilot/handover {"model", "leaving" | "joining": name, "url"?}`, which answers when the
handover is done — local mode calls it before it stops a retired worker and before it publishes
a new one. One handover per (model, kind, pod) runs at a time; a trigger that finds one running
or just finished joins it instead of starting another.

Prefixes move in rounds of `BATCH`, hottest first, so a handover cut short by its time bound
has delivered the ones that matter most. Guarantees: a handover runs beside request routing and
never blocks it; it is bounded by `timeoutSeconds`; any failure (pod gone, store down, timeout) only means the target
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

from kvpilot.kvtransfer import protocol
from kvpilot.kvtransfer.protocol import WarmReport, warm_report
from kvpilot.router.config import HandoverConfig
from kvpilot.router.hashring import dual_ring_owners
from kvpilot.router.hot_prefixes import (
    Hot,
    HotPrefixes,
    Move,
    Outcome,
    Owners,
    batches,
    combine,
    moves_in,
    moves_out,
)
from kvpilot.router.metrics import RouterMetrics
from kvpilot.router.policy import CacheEstimate, RequestView, RingPlacement
from kvpilot.router.pool import Member, Pool
from kvpilot.router.prewarm import tally, warm_body, warmable

log = logging.getLogger("kvpilot.router.handover")
RECENT_S = 30.0  # a finished handover answers repeated triggers for this long
BATCH = 8         # prefixes per export/import round


@dataclass(slots=True)
class _Model:
    name: str
    pool: Pool
    placement: RingPlacement    # the policy's ring key for a prompt: who owns a hot prefix
    estimate: CacheEstimate     # the policy's belief of what each pod caches
    cfg: HandoverConfig
    tracker: HotPrefixes
    owners: Owners
    gone: dict[str, str] = field(default_factory=dict)   # recently left pod → its URL
    warm: bool = False          # vLLM pods sharing a store: warm targets by request, export nothing


class _Failed(Exception):
    pass


class _Unsupported(Exception):
    """The pod cannot export prefixes (no such endpoint, or no KV store): not a failure, nothing to do."""


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
        self.moved_tokens = Counter("kvpilot_router_handover_tokens", "KV tokens pods loaded from the shared "
                                    "store when handovers warmed them (vLLM).", ["model", "kind"], registry=r)
        self.models: dict[str, _Model] = {}
        self.session: aiohttp.ClientSession | None = None
        self._tasks: dict[tuple[str, str, str], tuple[asyncio.Task[Outcome], float]] = {}

    def add_model(self, name: str, pool: Pool, cfg: HandoverConfig, block_size: int, warm: bool = False) -> None:
        """Hand over for the pool whose policy keeps the cache affinity: one that places prompts
        on DualMap's rings and keeps a cache estimate (both declared capabilities of the policy).
        `warm`: the pods share a KV store they load from by themselves (vLLM with kvpilot's
        connector), so targets are warmed by request instead of importing an export."""
        placement, estimate = pool.policy.ring_placement(), pool.policy.cache_estimate()
        if not cfg.enabled or placement is None or estimate is None:
            return
        m = _Model(name, pool, placement, estimate, cfg,
                   HotPrefixes(block_size, window=cfg.window, min_hits=cfg.min_hits, max_blocks=cfg.max_blocks),
                   dual_ring_owners(), warm=warm)
        self.models[name] = m
        pool.on_change = functools.partial(self._changed, m)

    def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    def observe(self, model: str, view: RequestView, prompt: str, chat: bool = False) -> None:
        m = self.models.get(model)
        if m is None or not view.block_hashes:
            return
        key, depth = m.placement.placement_key(view.block_hashes)
        m.tracker.observe(key, depth, view.block_hashes, prompt, chat)

    # -- triggers -------------------------------------------------------------------------------
    def _changed(self, m: _Model, joined: list[Member], left: list[Member]) -> None:
        for x in left:
            m.gone[x.endpoint.name] = x.url
        while len(m.gone) > 256:
            del m.gone[next(iter(m.gone))]
        if self.session is None or not m.tracker.hot(1):
            return  # before serving (the initial endpoint list), or nothing hot: nothing to move
        names = frozenset(x.endpoint.name for x in m.pool.healthy())
        # The pool before the change: a pod that joins in the same change (one replaced by another)
        # is a new owner of the leaving pod's keys, not one that already held them.
        before = (names - {x.endpoint.name for x in joined}) | {x.endpoint.name for x in left}
        for x in left:
            self._start(m, "scale_in", x.endpoint.name, x.url, before, after=names)
        for x in joined:
            self._start(m, "scale_out", x.endpoint.name, x.url, names)

    def _start(self, m: _Model, kind: str, pod: str, url: str, members: frozenset[str],
               after: frozenset[str] | None = None) -> asyncio.Task[Outcome]:
        now = time.monotonic()
        for k, (task, at) in list(self._tasks.items()):
            if task.done() and now - at > RECENT_S:
                del self._tasks[k]
        entry = self._tasks.get((m.name, kind, pod))
        if entry is not None:
            return entry[0]
        task = asyncio.get_running_loop().create_task(self._run(m, kind, pod, url, members, after))
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
        if kind == "scale_in" and member is None and pod not in m.gone:
            # Never in this pool (a P/D decode worker: the cache affinity is the prefill pool's).
            return web.json_response(Outcome("noop", detail=f"{pod} is not in the cache-affinity pool").body())
        url = str(body.get("url") or (member.url if member else m.gone.get(pod, ""))).rstrip("/")
        if not url:
            return web.json_response({"error": f"unknown pod {pod!r}: give its url"}, status=404)
        names = frozenset(x.endpoint.name for x in m.pool.healthy())
        members = names | {pod} if kind == "scale_in" else names - {pod}
        outcome = await asyncio.shield(self._start(m, kind, pod, url, members))
        return web.json_response(outcome.body())

    # -- the moves ---------------------------------------------------------------------------------
    async def _run(self, m: _Model, kind: str, pod: str, url: str, members: frozenset[str],
                   after: frozenset[str] | None = None) -> Outcome:
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + m.cfg.timeout_s
        moves, urls = self._plan(m, kind, pod, url, members, after)
        left_out = 0
        if m.warm:
            moves, left_out = warmable(moves)
        parts: list[Outcome] = []
        for batch in batches(moves, BATCH):
            try:
                async with asyncio.timeout_at(deadline):
                    part = await (self._warm_round(m, batch, urls) if m.warm else self._round(m, batch, urls))
                parts.append(part)
                if m.warm and part.outcome in ("failed", "unsupported"):
                    break   # the store is down or the engines cannot report: later rounds would only compute
            except _Unsupported as e:
                parts.append(Outcome("unsupported", detail=str(e)))
                break
            except (TimeoutError, aiohttp.ClientError, _Failed, ValueError) as e:
                parts.append(Outcome("failed", detail=str(e) or type(e).__name__))
                break
        out = combine(parts) if moves else Outcome("noop", detail="no hot prefix changes owner")
        if left_out:
            out.detail = "; ".join(filter(None, [out.detail, f"{left_out} chat prefixes left to load on first use"]))
        self.total.labels(m.name, kind, out.outcome).inc()
        self.moved.labels(m.name, kind).inc(out.prefixes)
        self.moved_bytes.labels(m.name, kind).inc(out.bytes)
        self.moved_tokens.labels(m.name, kind).inc(out.tokens)
        log.info("handover %s %s: %s", kind, pod, out.outcome,
                 extra={"model": m.name, "prefixes": out.prefixes, "bytes": out.bytes, "tokens": out.tokens,
                        "detail": out.detail,
                        "seconds": round(time.monotonic() - started, 3)})
        return out

    def _plan(self, m: _Model, kind: str, pod: str, url: str, members: frozenset[str],
              after: frozenset[str] | None = None) -> tuple[list[Move], dict[str, str]]:
        """Who exports which prefix to whom, and every pod's URL."""
        hot = m.tracker.hot(m.cfg.max_prefixes)
        urls = {x.endpoint.name: x.url for x in m.pool.members} | {pod: url}

        def held(owner: str, h: Hot) -> int:
            return m.estimate.cached_blocks(owner, list(h.hashes))

        if kind == "scale_in":
            # Warming a pod that turns out to hold the prefix costs one short request, so on vLLM
            # a remaining owner the router does not believe holds it is warmed too.
            plan = moves_in(hot, pod, members, m.owners, after, held if m.warm else None)
            return [Move(pod, target, h) for target, hs in plan.items() for h in hs if target in urls], urls

        plan = moves_out(hot, pod, members, m.owners, held)
        return [Move(source, pod, h) for source, hs in plan.items() for h in hs if source in urls], urls

    async def _round(self, m: _Model, moves: list[Move], urls: dict[str, str]) -> Outcome:
        """One round: every source exports its prefixes (in parallel), every target imports its share."""
        by_source: dict[str, dict[int, Hot]] = {}
        for mv in moves:
            by_source.setdefault(mv.source, {})[mv.prefix.key] = mv.prefix
        got = await asyncio.gather(*(self._export(urls[s], list(hs.values())) for s, hs in by_source.items()),
                                   return_exceptions=True)
        manifest: dict[str, Any] = {}
        for part in got:
            if isinstance(part, dict):
                manifest.update(part)
        if not manifest and got and all(isinstance(part, _Unsupported) for part in got):
            raise _Unsupported("no source has a KV store")
        if not manifest and any(isinstance(part, BaseException) for part in got):
            raise _Failed("; ".join(str(p) or type(p).__name__ for p in got if isinstance(p, BaseException)))
        plan: dict[str, list[Hot]] = {}
        for mv in moves:
            plan.setdefault(mv.target, []).append(mv.prefix)
        return await self._deliver(m, plan, manifest, urls)

    async def _export(self, url: str, prefixes: list[Hot]) -> dict[str, Any]:
        assert self.session is not None
        body = {"prefixes": [{"key": h.key, "text": h.text, "hits": h.hits} for h in prefixes]}
        async with self.session.post(url + protocol.PREFIX_EXPORT, json=body) as resp:
            if resp.status in (404, 409):  # no such endpoint (stock vLLM), or no KV store configured
                raise _Unsupported(f"{url} cannot export prefixes (HTTP {resp.status})")
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
            url = urls.get(pod, "")
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
            for h in hot:
                m.estimate.learn(pod, list(h.hashes))
        if failed:
            out.outcome, out.detail = ("partial" if out.prefixes else "failed"), "; ".join(failed)
        return out

    async def _import(self, url: str, manifest: dict[str, Any]) -> int:
        assert self.session is not None
        async with self.session.post(url + protocol.PREFIX_IMPORT, json={"manifest": manifest}) as resp:
            if resp.status != 200:
                raise _Failed(f"HTTP {resp.status}")
            return int((await resp.json())["blocks_received"])

    # -- warming from the shared store (vLLM) -----------------------------------------------------
    async def _warm_round(self, m: _Model, moves: list[Move], urls: dict[str, str]) -> Outcome:
        """One round: every target gets its prefixes as 1-token completions (in parallel); its
        shadow cache learns each one it answered (it holds the prefix now, loaded or computed)."""
        got = await asyncio.gather(*(self._warm(urls[mv.target], m.name, mv.prefix.text) for mv in moves),
                                   return_exceptions=True)
        out, answered = tally(list(zip(moves, got, strict=True)))
        for mv in answered:
            m.estimate.learn(mv.target, list(mv.prefix.hashes))
        return out

    async def _warm(self, url: str, model: str, text: str) -> WarmReport | None:
        assert self.session is not None
        async with self.session.post(url + "/v1/completions", json=warm_body(model, text)) as resp:
            if resp.status != 200:
                raise _Failed(f"HTTP {resp.status} {(await resp.text())[:200]}")
            body = await resp.json()
            return warm_report(body.get("kv_transfer_params") if isinstance(body, dict) else None)
