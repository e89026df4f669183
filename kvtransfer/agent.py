"""A NIXL-style transfer agent over a `BlockStore`.

NIXL's shape, kept small: an agent has a name and metadata another agent can load; transfers
are described by block descriptors, posted asynchronously, and complete (or fail) as a whole
with a handle the caller can poll or await; a notification rides along with a completed write.
What a block *is* (the KV of 16 or 512 tokens) is the caller's business; the agent moves bytes
and verifies them.

The caller is usually an engine or a proxy whose loop must keep stepping while tens of MiB move,
so nothing per byte runs on it: the store does its round trips in threads (`RedisStore`), a read's
checksums are verified in a thread, and `off_loop` runs the copies that make a write's bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from kvpilot.kvtransfer.store import BlockDescriptor, BlockStore, TransferError, checksum

T = TypeVar("T")


class XferState(Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass
class XferHandle:
    """One posted transfer. `wait()` returns the read buffers (empty for writes) or raises."""

    task: asyncio.Task[list[bytes]]
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def state(self) -> XferState:
        if not self.task.done():
            return XferState.PENDING
        return XferState.FAILED if self.task.exception() is not None else XferState.DONE

    async def wait(self) -> list[bytes]:
        try:
            return await self.task
        finally:
            self.finished = self.finished or time.monotonic()

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started


class KVAgent:
    def __init__(self, name: str, store: BlockStore) -> None:
        self.name = name
        self.store = store
        self.failures = 0
        self.bytes_moved = 0

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """`fn()` in a worker thread: building a write's buffers (copying KV out of a cache,
        checksumming it) is as much CPU per byte as sending them, and would stall the caller's
        loop as much."""
        return await asyncio.to_thread(fn)

    def metadata(self) -> dict[str, str]:
        """What a peer needs to read this agent's blocks (the store is shared, so: its name)."""
        return {"agent": self.name}

    def describe(self, keys: list[str], buffers: list[bytes]) -> list[BlockDescriptor]:
        return [BlockDescriptor(k, len(b), checksum(b)) for k, b in zip(keys, buffers, strict=True)]

    def post_write(self, descs: list[BlockDescriptor], buffers: list[bytes]) -> XferHandle:
        async def run() -> list[bytes]:
            await self.store.put([(d.key, b) for d, b in zip(descs, buffers, strict=True)])
            self.bytes_moved += sum(len(b) for b in buffers)
            return []

        return self._post(run())

    async def present(self, keys: list[str]) -> list[bool]:
        """Which blocks the store holds now (a lookup moves no data; another writer may still add
        or evict one right after)."""
        return await self.store.exists(keys)

    async def delete(self, keys: list[str]) -> None:
        """Drop blocks a reader is done with (the TTL is the fallback)."""
        await self.store.delete(keys)

    def post_read(self, descs: list[BlockDescriptor]) -> XferHandle:
        def verify(got: list[bytes | None]) -> list[bytes]:
            out: list[bytes] = []
            for d, data in zip(descs, got, strict=True):
                if data is None:
                    raise TransferError(f"block {d.key} is not in the store (expired or never written)")
                if d.checksum is not None and checksum(data) != d.checksum:
                    raise TransferError(f"block {d.key} does not match its descriptor's checksum")
                out.append(data)
            return out

        async def run() -> list[bytes]:
            got = await self.store.get([d.key for d in descs])
            # Checksums are per byte: off the loop unless there is nothing to hash.
            out = await asyncio.to_thread(verify, got) if any(d.checksum is not None for d in descs) \
                else verify(got)
            self.bytes_moved += sum(len(b) for b in out)
            return out

        return self._post(run())

    async def close(self) -> None:
        await self.store.close()

    def _post(self, coro: Coroutine[Any, Any, list[bytes]]) -> XferHandle:
        task = asyncio.create_task(coro)

        def count(t: asyncio.Task[list[bytes]]) -> None:
            if not t.cancelled() and t.exception() is not None:
                self.failures += 1

        task.add_done_callback(count)
        return XferHandle(task)
