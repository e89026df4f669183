"""Live migration of a running request between `kvpilot sim serve` processes, over the KV store.

Source side (`POST /kvpilot/migrate {"request_id", "target"}`, the id being the client's
X-Request-Id): the request keeps decoding while its KV goes to the store in rounds (all blocks,
then the blocks that changed), the target pulling each round as it lands; then the request is
paused, the last delta written, and the target asked to commit. Only that last step stops
decoding — its length is the reported `blocking_ms`.

Target side: `POST /kvpilot/migrations/{id}/blocks` pulls a round, `.../commit` pulls the last
delta and adopts the request into the engine at the same position (`Engine.adopt`), and
`GET .../stream` continues its SSE stream from the token where the source stopped. Tokens are
a pure function of (prompt, position), so the continuation is the one the source would have sent.

Any failure before the target's commit answer — store down or slow, a corrupt block, the
target full or unreachable, the request preempted or finished — aborts: the request is resumed
on the source (it never stopped before the final step) and the failure is counted. After the
commit the source drops its copy and ends its stream with `event: kvpilot.migrated`.

The KV bytes are stand-ins (random, `kv_bytes_per_token` per token, checksummed): the point is
to move the right amount through the real store with the real failure modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Histogram

from kvpilot.kvtransfer import protocol
from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.migration import CopyTuning, Step, block_bytes, blocks_to_copy, migration_block_key, next_step
from kvpilot.kvtransfer.store import BlockDescriptor, TransferError, open_store
from kvpilot.sim.kv_connector import stand_in_kv
from kvpilot.sim.sequence import Phase, Sequence
from kvpilot.sim.server import SimServer
from kvpilot.sim.streams import MIGRATED, Stream

BATCH_BYTES = 4 << 20       # per store call during the copy
ATTACH_TIMEOUT_S = 30.0     # a committed migration nobody streams from is dropped after this
_BLOCKING_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class MigrationAborted(Exception):
    """The migration cannot go on; the request stays (or is put back) on the source."""


@dataclass(slots=True)
class Incoming:
    """A migration this instance is receiving: blocks pulled so far, then the adopted stream."""

    started: float = field(default_factory=time.monotonic)
    bytes: int = 0
    keys: set[str] = field(default_factory=set)
    stream: Stream | None = None
    expiry: asyncio.TimerHandle | None = None


class Migrations:
    def __init__(self, server: SimServer, tuning: CopyTuning | None = None) -> None:
        self.server = server
        self.tuning = tuning or CopyTuning(block_tokens=server.block_size)
        cfg = server.cfg
        self.agent = KVAgent(f"{cfg.engine_id}-mig", open_store(cfg.kv_store, namespace="mig", timeout_s=1.0)) \
            if cfg.kv_store else None
        self.incoming: dict[str, Incoming] = {}
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        labels = {"model_name": cfg.model, "engine": "0"}
        names = ["model_name", "engine", "role", "outcome"]
        self.c_migrations = Counter("kvpilot:migrations", "Live migrations by role (source/target) and outcome.",
                                    names, registry=server.registry)
        self.h_blocking = Histogram("kvpilot:migration_blocking_seconds",
                                    "Stop-and-copy window of migrations out of this instance.",
                                    ["model_name", "engine"], registry=server.registry,
                                    buckets=_BLOCKING_BUCKETS).labels(**labels)
        self._labels = labels

    def _count(self, role: str, outcome: str) -> None:
        self.c_migrations.labels(**self._labels, role=role, outcome=outcome).inc()

    def add_routes(self, app: web.Application) -> None:
        route = protocol.MIGRATION_ROUTE
        app.router.add_post(protocol.MIGRATE, self.migrate)
        app.router.add_post(route + "/blocks", self.pull_blocks)
        app.router.add_post(route + "/commit", self.commit)
        app.router.add_delete(route, self.drop)
        app.router.add_get(route + "/stream", self.resume_stream)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.agent is not None:
            await self.agent.close()

    def _http(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10, sock_connect=2))
        return self.session

    # -- source ------------------------------------------------------------------------------
    async def migrate(self, request: web.Request) -> web.Response:
        try:
            body = protocol.MigrateRequest.model_validate_json(await request.read())
        except ValueError:
            return web.json_response({"error": "request_id and target (http URL) are required"}, status=400)
        stream = self.server.by_request_id.get(body.request_id)
        if stream is None:
            return web.json_response({"outcome": "not_found", "reason": f"no running request {body.request_id}"},
                                     status=404)
        result = await self.run(stream, body.target.rstrip("/"), body.round_delay_s)
        return web.json_response(result, status=200 if result["outcome"] == "migrated" else 409)

    async def run(self, stream: Stream, target: str, round_delay_s: float = 0.0) -> dict[str, Any]:
        seq = stream.seq
        why = self._unmovable(stream)
        if why:
            self._count("source", "rejected")
            return {"outcome": "rejected", "reason": why}
        assert self.agent is not None
        stream.migrating = True
        mid = uuid.uuid4().hex[:16]
        started = time.monotonic()
        copied = rounds = moved_bytes = 0
        paused = False
        try:
            while True:
                if seq.phase != Phase.RUNNING:
                    raise MigrationAborted(f"request left the running batch ({seq.phase.name.lower()})")
                kv_tokens = seq.computed
                moved_bytes += await self._copy(mid, target, copied, kv_tokens)
                copied, rounds = kv_tokens, rounds + 1
                if round_delay_s:
                    await asyncio.sleep(round_delay_s)
                if next_step(rounds, seq.computed - copied, self.tuning) is Step.STOP:
                    break
            if seq.phase != Phase.RUNNING:
                raise MigrationAborted(f"request left the running batch ({seq.phase.name.lower()})")
            stop = time.monotonic()
            self.server.engine.pause(seq)
            paused = True
            final = seq.computed
            last = await self._copy(mid, target, copied, final, commit=self._state(stream, mid))
            moved_bytes += last
            blocking = time.monotonic() - stop
        except (MigrationAborted, TransferError, aiohttp.ClientError, TimeoutError) as e:
            if paused and seq.phase == Phase.PAUSED:  # (the client may have gone meanwhile)
                self.server.engine.resume(seq)
                self.server.wake()
            stream.migrating = False
            if isinstance(e, TransferError):
                self.server.c_kv_failed.inc()
            self._count("source", "aborted")
            await self._drop_remote(target, mid)
            return {"outcome": "aborted", "reason": str(e) or type(e).__name__, "rounds": rounds,
                    "bytes": moved_bytes}
        # Committed: the target owns the request now. Drop ours and end our stream with a pointer.
        tokens_at_stop = seq.output
        self.server.engine.abort(seq)
        stream.handoff = protocol.Handoff(target=target, migration_id=mid,
                                          stream=protocol.migration_path(mid, "stream"))
        stream.queue.put_nowait(MIGRATED)
        self.h_blocking.observe(blocking)
        self._count("source", "migrated")
        return {"outcome": "migrated", "migration_id": mid, "target": target, "rounds": rounds,
                "bytes": moved_bytes, "last_bytes": last, "kv_tokens": final, "tokens_at_stop": tokens_at_stop,
                "blocking_ms": blocking * 1000, "total_ms": (time.monotonic() - started) * 1000}

    def _unmovable(self, stream: Stream) -> str | None:
        seq = stream.seq
        if self.agent is None:
            return "this instance has no KV store (--kv-store)"
        if not stream.migratable:
            return f"the request's client cannot splice a migrated stream (not opened with {protocol.MIGRATABLE})"
        if stream.migrating:
            return "a migration of this request is already under way"
        if seq.phase != Phase.RUNNING or not seq.decoding:
            return "the request is not decoding"
        if seq.max_tokens - seq.output < 2:
            return "the request is about to finish"
        return None

    async def _copy(self, mid: str, target: str, copied: int, kv_tokens: int,
                    commit: protocol.MigrationState | None = None) -> int:
        """Write the blocks between `copied` and `kv_tokens` and have the target pull them, in
        batches of about `BATCH_BYTES` so each store call stays well inside its timeout; with
        `commit`, the last batch goes with the commit. Returns the bytes written."""
        assert self.agent is not None
        bt, bpt = self.tuning.block_tokens, self.server.cfg.profile.kv_bytes_per_token
        indices = list(blocks_to_copy(copied, kv_tokens, bt))
        per_batch = max(1, BATCH_BYTES // max(1, bt * bpt))
        batches = [indices[i : i + per_batch] for i in range(0, len(indices), per_batch)] or [[]]
        written = 0
        for n, batch in enumerate(batches):
            descs, buffers = await self.agent.off_loop(partial(self._build, mid, batch, kv_tokens))
            if descs:
                await self.agent.post_write(descs, buffers).wait()
            written += sum(len(b) for b in buffers)
            final = commit is not None and n == len(batches) - 1
            payload: dict[str, Any] = {"blocks": protocol.encode_blocks(descs)}
            if final and commit is not None:
                payload["state"] = commit.model_dump()
            path = "commit" if final else "blocks"
            async with self._http().post(target + protocol.migration_path(mid, path), json=payload) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    raise MigrationAborted(f"target refused {path}: {answer.get('reason', resp.status)}")
        return written

    def _build(self, mid: str, batch: list[int], kv_tokens: int) -> tuple[list[BlockDescriptor], list[bytes]]:
        """A batch's stand-in KV and descriptors (run on the agent's I/O thread: it is memcpy and
        checksums, which on the engine's loop would stall the decode this copy runs beside)."""
        assert self.agent is not None
        bt, bpt = self.tuning.block_tokens, self.server.cfg.profile.kv_bytes_per_token
        buffers = [stand_in_kv(block_bytes(i, kv_tokens, bt, bpt)) for i in batch]
        return self.agent.describe([migration_block_key(mid, i) for i in batch], buffers), buffers

    def _state(self, stream: Stream, mid: str) -> protocol.MigrationState:
        seq = stream.seq
        return protocol.MigrationState(
            migration_id=mid, request_id=seq.request_id, prompt_tokens=seq.prompt_tokens,
            block_hashes=seq.block_hashes, max_tokens=seq.max_tokens, output=seq.output, computed=seq.computed,
            cached_tokens=seq.cached_tokens, seed=stream.seed, chat=stream.chat, include_usage=stream.include_usage,
            created=stream.created)

    async def _drop_remote(self, target: str, mid: str) -> None:
        try:
            quick = aiohttp.ClientTimeout(total=2)
            async with self._http().delete(target + protocol.migration_path(mid), timeout=quick):
                pass
        except (aiohttp.ClientError, TimeoutError):
            pass  # the target expires it on its own

    # -- target ------------------------------------------------------------------------------
    async def _pull(self, mid: str, raw: Any) -> Incoming:
        if self.agent is None:
            raise MigrationAborted("this instance has no KV store (--kv-store)")
        entry = self.incoming.get(mid)
        if entry is None:
            entry = self.incoming[mid] = Incoming()
            self._expire_later(mid)
        descs = protocol.decode_blocks(raw)
        if descs:
            entry.keys.update(d.key for d in descs)
            data = await self.agent.post_read(descs).wait()
            entry.bytes += sum(len(b) for b in data)
        return entry

    def _delete_blocks(self, entry: Incoming) -> None:
        """Free the store of a migration's blocks in the background (the TTL is the fallback)."""
        if self.agent is None or not entry.keys:
            return
        agent, keys = self.agent, sorted(entry.keys)
        entry.keys = set()

        async def run() -> None:
            with contextlib.suppress(TransferError):
                await agent.delete(keys)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def pull_blocks(self, request: web.Request) -> web.Response:
        mid = request.match_info["mid"]
        try:
            body = await request.json()
            await self._pull(mid, body.get("blocks"))
        except (ValueError, AttributeError) as e:
            return web.json_response({"reason": f"bad blocks body: {e}"}, status=400)
        except (MigrationAborted, TransferError) as e:
            self._fail_incoming(mid, e)
            return web.json_response({"reason": str(e)}, status=502)
        return web.json_response({"ok": True})

    async def commit(self, request: web.Request) -> web.Response:
        mid = request.match_info["mid"]
        try:
            body = await request.json()
            state = protocol.MigrationState.model_validate(body.get("state"))
            if not self.server.engine.can_adopt(state.computed):
                raise MigrationAborted("no room for the request here (batch slots or KV blocks)")
            entry = await self._pull(mid, body.get("blocks"))
            stream = self._adopt(state)
        except (MigrationAborted, TransferError, ValueError, KeyError, AttributeError) as e:
            self._fail_incoming(mid, e)
            return web.json_response({"reason": str(e)}, status=409)
        entry.stream = stream
        self._delete_blocks(entry)
        self._count("target", "migrated")
        return web.json_response({"ok": True, "bytes": entry.bytes})

    def _adopt(self, state: protocol.MigrationState) -> Stream:
        server = self.server
        seq = Sequence(state.request_id, server.now(), state.prompt_tokens, list(state.block_hashes), state.max_tokens)
        seq.output, seq.computed, seq.cached_tokens = state.output, state.computed, state.cached_tokens
        seq.first_token_time = seq.first_scheduled = server.now()
        server.engine.adopt(seq)
        stream = Stream(seq, state.seed, chat=state.chat, include_usage=state.include_usage, created=state.created,
                        sent=seq.output)
        server.streams[seq] = stream
        server.wake()
        return stream

    def _fail_incoming(self, mid: str, e: Exception) -> None:
        if isinstance(e, TransferError):
            self.server.c_kv_failed.inc()
        self._count("target", "aborted")
        self._forget(mid)

    def _forget(self, mid: str) -> None:
        entry = self.incoming.pop(mid, None)
        if entry is None:
            return
        self._delete_blocks(entry)
        if entry.expiry is not None:
            entry.expiry.cancel()
        if entry.stream is not None:  # committed but never streamed: free the engine's work
            self.server.streams.pop(entry.stream.seq, None)
            self.server.engine.abort(entry.stream.seq)

    def _expire_later(self, mid: str) -> None:
        entry = self.incoming[mid]
        entry.expiry = asyncio.get_running_loop().call_later(ATTACH_TIMEOUT_S, self._forget, mid)

    async def drop(self, request: web.Request) -> web.Response:
        mid = request.match_info["mid"]
        entry = self.incoming.get(mid)
        if entry is not None and entry.stream is None:
            self._forget(mid)
        return web.json_response({"ok": True})

    async def resume_stream(self, request: web.Request) -> web.StreamResponse:
        mid = request.match_info["mid"]
        entry = self.incoming.pop(mid, None)
        if entry is None or entry.stream is None:
            return web.json_response({"error": f"no committed migration {mid}"}, status=404)
        if entry.expiry is not None:
            entry.expiry.cancel()
        stream, server = entry.stream, self.server
        external_id = request.headers.get(protocol.REQUEST_ID)
        if external_id:
            stream.migratable = request.headers.get(protocol.MIGRATABLE) == "1"
            server.by_request_id[external_id] = stream
        try:
            return await server.stream_response(request, stream, {})
        finally:
            server.streams.pop(stream.seq, None)
            if external_id and server.by_request_id.get(external_id) is stream:
                del server.by_request_id[external_id]
            if not stream.seq.finished:
                server.engine.abort(stream.seq)
