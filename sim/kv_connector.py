"""How a simulated prefill instance hands KV to a decode instance (vLLM's P/D flow).

The prefill request carries `kv_transfer_params: {"do_remote_decode": true}` and `max_tokens=1`;
its response carries the params the decode request must send back (`do_remote_prefill`, the
remote engine and block ids). Two connectors keep that contract:
- `LocalKVConnector` moves no bytes; the decode side waits the modelled transfer time.
- `StoreKVConnector` moves real bytes, `kv_bytes_per_token` per prompt token, through a
  `kvpilot.kvtransfer` agent (Redis by default) with checksums; the decode side waits for the
  actual transfer. Any failure (Redis down, slow, a block missing or corrupt) degrades to
  recompute: the decode instance prefills the prompt itself, and the failure is counted.
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass
from typing import Any, Protocol

from kvpilot.kvtransfer import protocol
from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.store import BlockDescriptor, TransferError


@dataclass(slots=True)
class KVImport:
    tokens: int            # prompt tokens whose KV the decode side now has (0: recompute)
    bytes: int = 0
    failed: bool = False


def stand_in_kv(size: int) -> bytes:
    """`size` bytes standing in for a block's KV: a random 8-byte seed repeated, so every block's
    checksum differs (what arrived proves which block it was) at memcpy speed. `os.urandom` of one
    hot 512-token prefix of an 8B model (64 MiB) held the simulator's event loop, and with it its
    engine, for 0.8 s; a scale-out handover of eight of them stalled an instance for seconds."""
    seed = os.urandom(8)
    return seed * (size // 8) + seed[: size % 8]


class KVConnector(Protocol):
    async def export(self, request_id: str, prompt_tokens: int, block_hashes: list[int]) -> dict[str, Any]: ...

    async def import_kv(self, params: dict[str, Any], prompt_tokens: int) -> KVImport: ...

    async def close(self) -> None: ...


class LocalKVConnector:
    """P/D params with vLLM's field names; the transfer is modelled as bytes over a nominal link."""

    def __init__(self, engine_id: str, host: str, port: int, kv_bytes_per_token: int, time_scale: float = 1.0,
                 link_bytes_per_s: float = 25e9) -> None:
        self.engine_id, self.host, self.port = engine_id, host, port
        self.kv_bytes_per_token = kv_bytes_per_token
        self.time_scale = time_scale
        self.link_bytes_per_s = link_bytes_per_s

    async def export(self, request_id: str, prompt_tokens: int, block_hashes: list[int]) -> dict[str, Any]:
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                "remote_block_ids": block_hashes, "remote_host": self.host, "remote_port": self.port,
                "remote_request_id": request_id, "num_tokens": prompt_tokens}

    async def import_kv(self, params: dict[str, Any], prompt_tokens: int) -> KVImport:
        tokens = min(int(params.get("num_tokens", prompt_tokens)), prompt_tokens)
        size = tokens * self.kv_bytes_per_token
        await asyncio.sleep(size / self.link_bytes_per_s / self.time_scale)
        return KVImport(tokens, size)

    async def close(self) -> None:
        return None


class StoreKVConnector(LocalKVConnector):
    """Real bytes through a block store, in blocks of `block_tokens` tokens."""

    def __init__(self, agent: KVAgent, engine_id: str, host: str, port: int, kv_bytes_per_token: int,
                 block_tokens: int = 256) -> None:
        super().__init__(engine_id, host, port, kv_bytes_per_token)
        self.agent = agent
        self.block_tokens = block_tokens

    async def export(self, request_id: str, prompt_tokens: int, block_hashes: list[int]) -> dict[str, Any]:
        params = await super().export(request_id, prompt_tokens, block_hashes)
        n = math.ceil(prompt_tokens / self.block_tokens)
        sizes = [min(self.block_tokens, prompt_tokens - i * self.block_tokens) * self.kv_bytes_per_token
                 for i in range(n)]
        keys = [f"{self.engine_id}:{request_id}:{i}" for i in range(n)]

        def build() -> tuple[list[BlockDescriptor], list[bytes]]:
            buffers = [stand_in_kv(size) for size in sizes]
            return self.agent.describe(keys, buffers), buffers

        try:  # the bytes are made on the agent's I/O thread, like they are sent: not on the engine's loop
            descs, buffers = await self.agent.off_loop(build)
            await self.agent.post_write(descs, buffers).wait()
        except TransferError:
            return {**params, "num_tokens": 0}  # nothing to pull: decode recomputes
        params["kv_blocks"] = protocol.encode_blocks(descs)
        return params

    async def import_kv(self, params: dict[str, Any], prompt_tokens: int) -> KVImport:
        raw = params.get("kv_blocks")
        if not raw:
            return KVImport(0, failed=bool(params.get("do_remote_prefill")))
        try:
            data = await self.agent.post_read(protocol.decode_blocks(raw)).wait()
        except (TransferError, ValueError):
            return KVImport(0, failed=True)
        tokens = min(prompt_tokens, sum(len(b) for b in data) // self.kv_bytes_per_token)
        return KVImport(tokens, sum(len(b) for b in data))

    async def close(self) -> None:
        await self.agent.close()
