"""Live migration in the router: splice a moved request's stream, trigger moves, count outcomes.

Streams of a model with a `migration:` config are opened with `X-Request-Id` and
`X-Kvpilot-Migratable: 1`, and relayed event by event instead of byte by byte. When the worker
ends a stream with `event: kvpilot.migrated` (the request now runs on the target), that event
is not forwarded: the relay opens the target's continuation stream and goes on from it, so the
client sees one uninterrupted SSE stream. The worker guarantees the continuation starts at the
first token it did not send, so nothing is missing or repeated.

Moves are asked for on `POST /kvpilot/migrate {"request_id", "target"?}` (operators, tests) or
by a loop that feeds `migration_policy.plan_migrations` each interval (`enabled: true`). The
source worker does the copy; a failed or refused migration leaves the request where it was.

A model with `engine: vllm` has no worker-side migration: its streams are moved by *resume*
(`kvpilot.router.resume`), the router re-issuing prompt + generated token ids to the target.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from kvpilot.kvtransfer import protocol
from kvpilot.openai_errors import ApiError
from kvpilot.router.metrics import RouterMetrics
from kvpilot.router.migration_policy import (
    Candidate,
    InstanceSignal,
    MigrationConfig,
    Thresholds,
    plan_migrations,
)
from kvpilot.router.pool import Member, Pool
from kvpilot.router.resume import Pending, ResumeState, upstream_body
from kvpilot.router.resume import relay as resume_relay
from kvpilot.router.resume_cut import CutAlign

log = logging.getLogger("kvpilot.router.migration")
COOLDOWN_INTERVALS = 5


class SseSplicer:
    """Cuts an SSE byte stream into whole events; holds back the migration handoff event."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> tuple[bytes, protocol.Handoff | None]:
        """Complete events to forward, and the handoff if this data ended the stream with one."""
        self.buf += data
        out: list[bytes] = []
        while (end := self.buf.find(b"\n\n")) >= 0:
            event, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
            if protocol.is_migrated_event(event):
                self.buf = b""
                return b"".join(out), protocol.parse_migrated_event(event)
            out.append(event)
        return b"".join(out), None

    def flush(self) -> bytes:
        rest, self.buf = self.buf, b""
        return rest


@dataclass(slots=True, eq=False)
class ActiveStream:
    """A streaming request the router relays, with what the policy needs to know about it."""

    request_id: str
    model: str
    pool: Pool
    member: Member
    prompt_tokens: int
    max_tokens: int | None
    ewma: float
    events: int = 0
    last_event: float | None = None
    gap_s: float | None = None          # smoothed inter-event gap: the stream's observed TPOT
    migrating: bool = False
    moves: list[str] = field(default_factory=list)
    moved_at: float = -1e18
    resume: ResumeState | None = None   # engine vllm: what a move by resume needs

    def on_events(self, n: int, now: float) -> None:
        if self.last_event is not None:
            gap = now - self.last_event
            self.gap_s = gap if self.gap_s is None else self.gap_s + self.ewma * (gap - self.gap_s)
        self.last_event = now
        self.events += n


@dataclass(slots=True)
class _Model:
    pool: Pool
    cfg: MigrationConfig
    slo_ttft_s: float
    engine: str = "simulator"


class Migrator:
    def __init__(self, metrics: RouterMetrics) -> None:
        self.recent: dict[str, deque[dict[str, Any]]] = {}   # model → last migrations, for the dashboard
        self.metrics = metrics
        self.models: dict[str, _Model] = {}
        self.active: dict[str, ActiveStream] = {}
        self.session: aiohttp.ClientSession | None = None
        self._loop: asyncio.Task[None] | None = None

    def add_model(self, name: str, pool: Pool, cfg: MigrationConfig | None, slo_ttft_s: float,
                  engine: str = "simulator") -> None:
        if cfg is not None:
            self.models[name] = _Model(pool, cfg, slo_ttft_s, engine)

    def upstream_body(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """The body to send upstream: with token ids asked for when streams of the model move by resume."""
        m = self.models.get(model)
        return upstream_body(body) if m is not None and m.engine == "vllm" else body

    def headers(self, model: str, request_id: str) -> dict[str, str] | None:
        """Upstream headers that make a stream migratable (None: migration is off for the model)."""
        if model not in self.models:
            return None
        return {protocol.REQUEST_ID: request_id, protocol.MIGRATABLE: "1"}

    # -- splicing ----------------------------------------------------------------------------
    async def relay(self, up: aiohttp.ClientResponse, request_id: str, model: str, pool: Pool, member: Member,
                    prompt_tokens: int, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """The client's bytes: the upstream's, continued on the target after each migration."""
        if model not in self.models or self.session is None:
            async for data in up.content.iter_any():
                yield data
            return
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        active = ActiveStream(request_id, model, pool, member, prompt_tokens,
                              max_tokens if isinstance(max_tokens, int) else None, 0.2)
        self.active[request_id] = active
        first = member
        source, opened = up, None
        try:
            if self.models[model].engine == "vllm":
                async for data in self._resume_relay(up, active, body):
                    yield data
                return
            while True:
                splicer, handoff = SseSplicer(), None
                async for data in source.content.iter_any():
                    out, handoff = splicer.feed(data)
                    if out:
                        active.on_events(out.count(b"\n\n"), time.monotonic())
                        yield out
                    if handoff is not None:
                        break
                if handoff is None:
                    if tail := splicer.flush():
                        yield tail
                    return
                if opened is not None:
                    opened.release()
                target = handoff.target
                opened = await self.session.get(target + handoff.stream,
                                                headers=self.headers(model, request_id))
                if opened.status != 200:
                    raise aiohttp.ClientPayloadError(f"migration target {target} answered {opened.status}")
                source = opened
                moved_to = next((m for m in pool.members if m.url == target.rstrip("/")), None)
                if moved_to is not None:  # the load follows the request (restored below for the caller)
                    active.member.load.in_flight -= 1
                    moved_to.load.in_flight += 1
                    active.member = moved_to
                active.moves.append(target)
                active.moved_at = time.monotonic()
        finally:
            if opened is not None:
                opened.release()
            if active.member is not first:
                active.member.load.in_flight -= 1
                first.load.in_flight += 1
            self.active.pop(request_id, None)

    def _resume_relay(self, up: aiohttp.ClientResponse, active: ActiveStream,
                      body: dict[str, Any]) -> AsyncIterator[bytes]:
        assert self.session is not None
        active.resume = ResumeState(body)

        def moved(target: Member) -> None:
            active.member.load.in_flight -= 1   # the load follows the request (restored by `relay`)
            target.load.in_flight += 1
            active.member = target
            active.moves.append(target.url)
            active.moved_at = time.monotonic()

        return resume_relay(self.session, up, active.resume, self.headers(active.model, active.request_id),
                            self.models[active.model].cfg.resume_timeout_s,
                            lambda n: active.on_events(n, time.monotonic()), moved)

    # -- moves -------------------------------------------------------------------------------
    async def migrate(self, request_id: str, target_name: str | None = None,
                      round_delay_s: float = 0.0) -> tuple[int, dict[str, Any]]:
        """Ask the request's current worker to move it; returns (HTTP status, result)."""
        active = self.active.get(request_id)
        if active is None or self.session is None:
            return 404, {"outcome": "not_found", "reason": f"no migratable stream {request_id} in flight"}
        if active.migrating:
            return 409, {"outcome": "rejected", "reason": "a migration of this request is under way"}
        pool, source = active.pool, active.member
        if active.resume is not None and (why := active.resume.not_now()) is not None:
            return 409, self._count(active.model, {"outcome": "rejected", "reason": why})
        candidates = [m for m in pool.healthy() if m is not source]
        if target_name is not None:
            candidates = [m for m in candidates if m.endpoint.name == target_name]
        if not candidates:
            return 409, self._count(active.model, {"outcome": "no_target", "reason": "no other healthy endpoint"})
        target = min(candidates, key=lambda m: (m.load.in_flight, m.load.engine_running, m.endpoint.name))
        active.migrating = True
        if active.resume is not None:
            return await self._resume(active, source, target)
        try:
            ask = protocol.MigrateRequest(request_id=request_id, target=target.url, round_delay_s=round_delay_s)
            async with self.session.post(source.url + protocol.MIGRATE, json=ask.model_dump()) as resp:
                result: dict[str, Any] = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
            status, result = 502, {"outcome": "failed", "reason": f"source unreachable: {e or type(e).__name__}"}
        finally:
            active.migrating = False
        result.update(source=source.endpoint.name, target_endpoint=target.endpoint.name)
        log.info("migration %s", result.get("outcome"), extra={"request_id": request_id, "model": active.model,
                                                               "endpoint": source.endpoint.name})
        return status, self._count(active.model, result)

    async def _resume(self, active: ActiveStream, source: Member, target: Member) -> tuple[int, dict[str, Any]]:
        """Hand the move to the stream's relay, which owns both connections, and wait for its outcome."""
        assert active.resume is not None
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        active.resume.pending = Pending(target, done, self._align(active.model, source, target))
        active.resume.wake.set()
        try:  # the relay answers within the cut's wait (<= half the resume timeout) + the resume timeout
            result = await asyncio.wait_for(done, self.models[active.model].cfg.resume_timeout_s * 1.5 + 10)
        except TimeoutError:
            result = {"outcome": "aborted", "reason": "the stream's relay did not answer"}
        finally:
            active.migrating = False
        status = {"migrated": 200, "rejected": 409}.get(str(result.get("outcome")), 502)
        result.update(source=source.endpoint.name, target_endpoint=target.endpoint.name)
        log.info("migration by resume %s", result.get("outcome"),
                 extra={"request_id": active.request_id, "model": active.model, "endpoint": source.endpoint.name})
        return status, self._count(active.model, result)

    def _align(self, model: str, source: Member, target: Member) -> CutAlign | None:
        """How a move by resume between these two engines aligns its cut (None: it cuts at once).
        The block size is the config's or, as vLLM reports it, the engines' own; two engines that
        disagree share no blocks anyway."""
        cfg = self.models[model].cfg
        sizes = {source.load.kv_block_size, target.load.kv_block_size}
        size = cfg.block_size or (sizes.pop() if len(sizes) == 1 else None)
        if size is None or cfg.align_cut_tokens <= 0:
            return None
        return CutAlign(size, min(cfg.cut_slack_tokens, size - 1), cfg.align_cut_tokens, cfg.resume_load_wait_s,
                        cfg.pre_copy)

    def _count(self, model: str, result: dict[str, Any]) -> dict[str, Any]:
        self.metrics.migrations.labels(model, str(result.get("outcome", "failed"))).inc()
        self.recent.setdefault(model, deque(maxlen=20)).append({"time": time.time(), **result})
        if result.get("outcome") == "migrated" and "blocking_ms" in result:
            self.metrics.migration_blocking.labels(model).observe(float(result["blocking_ms"]) / 1000)
        return result

    async def handle(self, request: web.Request) -> web.Response:
        """POST /kvpilot/migrate {"request_id", "target"?: endpoint name}."""
        try:
            body = await request.json()
            rid, target = body["request_id"], body.get("target")
            if not isinstance(rid, str) or (target is not None and not isinstance(target, str)):
                raise TypeError
            delay = float(body.get("round_delay_s", 0.0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return ApiError(400, "body must be {request_id: str, target?: str}").response()
        status, result = await self.migrate(rid, target, delay)
        return web.json_response(result, status=status)

    # -- the automatic trigger ---------------------------------------------------------------
    def signals(self, name: str) -> list[InstanceSignal]:
        """The policy's view of each healthy endpoint. A request that moved within the last few
        intervals is not a candidate again (no ping-pong while the picture settles), nor one that
        resume cannot move (engine vllm: chat, stop strings, …)."""
        m = self.models[name]
        settle = time.monotonic() - COOLDOWN_INTERVALS * m.cfg.interval_s
        out = []
        for member in m.pool.healthy():
            streams = [a for a in self.active.values() if a.member is member and a.model == name]
            gaps = [a.gap_s for a in streams if a.gap_s is not None]
            cands = tuple(Candidate(a.request_id, a.prompt_tokens + a.events,
                                    (a.max_tokens - a.events) if a.max_tokens is not None else 1 << 30)
                          for a in streams if not a.migrating and a.moved_at < settle
                          and (a.resume is None or a.resume.not_now() is None))
            backlog = member.load.pending_prefill_tokens * m.cfg.prefill_token_s
            out.append(InstanceSignal(member.endpoint.name, sum(gaps) / len(gaps) if gaps else None, backlog, cands))
        return out

    async def _run(self) -> None:
        while True:
            for name, m in self.models.items():
                if not m.cfg.enabled:
                    continue
                th = Thresholds(m.cfg.theta, m.cfg.slo_tpot_ms / 1000, m.slo_ttft_s, m.cfg.min_remaining_tokens)
                try:
                    for move in plan_migrations(self.signals(name), th, m.cfg.max_moves):
                        await self.migrate(move.request_id, move.target)
                except Exception:  # the trigger must outlive any one bad round
                    log.exception("migration round failed", extra={"model": name})
            await asyncio.sleep(min((m.cfg.interval_s for m in self.models.values()), default=1.0))

    def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        if any(m.cfg.enabled for m in self.models.values()):
            self._loop = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
