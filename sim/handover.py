"""Prefix-cache handover on a simulator instance: the HTTP side of `kvpilot.kvtransfer.scaling`.

`POST /kvpilot/prefixes/export {"prefixes": [{"key", "block_hashes" | "text", "hits"?}]}` writes
this instance's cached blocks of those prefixes to the KV store and answers the manifest (502
when the blocks are here but the store did not take them);
`POST /kvpilot/prefixes/import {"manifest": {key: [[block key, size, checksum], …]}}` pulls a
manifest and puts the blocks in this instance's prefix cache (`Engine.warm`), so requests for
those prefixes hit at once. A leaving pod exports before it goes and its ring successors import
(cache-preserving scale-in); a new pod imports what a current owner exported (pre-warm).
Block hashes are the engine's (`kvpilot.tokens.block_hashes` at the engine's block size).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from kvpilot.kvtransfer import protocol
from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.scaling import HotPrefix, Manifest, PrefixHandover, block_hash_of
from kvpilot.kvtransfer.store import open_store
from kvpilot.sim.kv_connector import stand_in_kv
from kvpilot.sim.server import SimServer
from kvpilot.tokens import block_hashes


class PrefixEndpoints:
    """The two endpoints, over one `PrefixHandover` for the instance's life. Its agent builds the
    stand-in KV and its store sends it in worker threads: the engine's steps share the server's
    loop, and doing it there stalled the instance for seconds (a scale-out handover of eight hot prefixes
    froze its ring owner for ~25 s on a loaded 2-core machine), where a GPU's KV copy does not
    stop its compute."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        url = server.cfg.kv_store
        self.handover = PrefixHandover(KVAgent(f"{server.cfg.engine_id}-pfx", open_store(url, namespace="pfx"))) \
            if url else None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(protocol.PREFIX_EXPORT, self.export)
        app.router.add_post(protocol.PREFIX_IMPORT, self.import_)

    async def close(self) -> None:
        if self.handover is not None:
            await self.handover.agent.close()

    def _hashes(self, prefix: dict[str, Any]) -> tuple[int, ...]:
        """The prefix's block hashes as given, or hashed here from its text at this engine's
        block size (the router knows prompts, not the engine's block size)."""
        if "text" in prefix:
            return tuple(block_hashes(str(prefix["text"]), self.server.block_size))
        return tuple(int(h) for h in prefix["block_hashes"])

    async def export(self, request: web.Request) -> web.Response:
        if self.handover is None:
            return web.json_response({"error": "this instance has no KV store (--kv-store)"}, status=409)
        try:
            body: dict[str, Any] = await request.json()
            prefixes = [HotPrefix(int(p["key"]), self._hashes(p), int(p.get("hits", 0))) for p in body["prefixes"]]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "prefixes: [{key, block_hashes | text, hits?}] required"}, status=400)
        # Which blocks are cached is read here, on the engine's loop; the bytes are made off it.
        cached = self.server.engine.pool.cached
        present = {h for p in prefixes for h in p.block_hashes if h in cached}
        size = self.server.engine.block_size * self.server.cfg.profile.kv_bytes_per_token

        def read_block(block_hash: int) -> bytes | None:
            """The block's KV if cached here (stand-in bytes of the right size)."""
            return stand_in_kv(size) if block_hash in present else None

        manifest = await self.handover.export(prefixes, read_block)
        if not manifest.prefixes and any(p.block_hashes and p.block_hashes[0] in cached for p in prefixes):
            # Blocks were here but the store write failed: say so, so the caller counts a failure.
            return web.json_response({"error": "the KV store did not take the blocks"}, status=502)
        return web.json_response({"manifest": protocol.encode_manifest(manifest.prefixes), "bytes": manifest.bytes})

    async def import_(self, request: web.Request) -> web.Response:
        if self.handover is None:
            return web.json_response({"error": "this instance has no KV store (--kv-store)"}, status=409)
        try:
            body: dict[str, Any] = await request.json()
            manifest = Manifest(protocol.decode_manifest(body["manifest"]))
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "manifest: {key: [[block key, size, checksum]]} required"},
                                     status=400)
        got = await self.handover.import_(manifest)
        if not got and manifest.prefixes:
            self.server.c_kv_failed.inc()  # nothing arrived: requests for these prefixes recompute
        added = 0
        for descs in manifest.prefixes.values():
            chain: list[int] = []
            for d in descs:  # a prefix is usable up to its first block that did not arrive
                h = block_hash_of(d.key)
                if h not in got:
                    break
                chain.append(h)
            added += self.server.engine.warm(chain)
        self.server.c_kv_bytes.inc(sum(len(b) for b in got.values()))
        return web.json_response({"blocks_added": added, "blocks_received": len(got)})
