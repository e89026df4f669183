"""KV block stores: where blocks live between the instance that wrote them and the one that reads.

Shaped after NIXL's model — agents register memory, describe blocks, and move them with
asynchronous transfers that complete or fail as a whole — but over a key-value store, so that
Redis (the default) and an in-process dict (unit tests, single-process local mode) are
interchangeable, and an RDMA backend can slot in behind the same `BlockStore` protocol.

Redis key schema (namespace `ns`, block key `k` = the block's chained prefix hash in hex):
  kvp:{ns}:blk:{k}        one value: 16-byte header (xxh64 checksum, length, chunk count) + data
                           when the block fits in one chunk, else the header alone
  kvp:{ns}:blk:{k}:{i}    chunk i of a large block (`chunk_bytes` each)
Every key carries the same TTL, so abandoned transfers expire on their own.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import redis
import xxhash

_HEADER = struct.Struct(">QII")  # checksum, total length, chunks (0 = data inline)
T = TypeVar("T")


class TransferError(Exception):
    """A block could not be moved: missing, corrupt, or the store failed or timed out."""


def checksum(data: bytes) -> int:
    return int(xxhash.xxh64_intdigest(data))


@dataclass(slots=True, frozen=True)
class BlockDescriptor:
    """One block in a transfer: its key, its size, and (on reads) the checksum to expect."""

    key: str
    size: int
    checksum: int | None = None


class BlockStore(Protocol):
    async def put(self, blocks: list[tuple[str, bytes]]) -> None: ...

    async def get(self, keys: list[str]) -> list[bytes | None]: ...

    async def delete(self, keys: list[str]) -> None: ...

    async def exists(self, keys: list[str]) -> list[bool]: ...

    async def close(self) -> None: ...


class MemoryStore:
    """In-process store: the same contract as Redis, for unit tests and single-process use."""

    def __init__(self) -> None:
        self.blocks: dict[str, bytes] = {}

    async def put(self, blocks: list[tuple[str, bytes]]) -> None:
        for key, data in blocks:
            self.blocks[key] = bytes(data)

    async def get(self, keys: list[str]) -> list[bytes | None]:
        return [self.blocks.get(k) for k in keys]

    async def delete(self, keys: list[str]) -> None:
        for k in keys:
            self.blocks.pop(k, None)

    async def exists(self, keys: list[str]) -> list[bool]:
        return [k in self.blocks for k in keys]

    async def close(self) -> None:
        self.blocks.clear()


class RedisStore:
    """Pipelined binary puts and gets with checksums, chunking and a TTL on every key.

    Every Redis round trip runs in this store's own small thread pool with a blocking client,
    never on the caller's event loop: packing a pipeline of tens of MiB and pushing it through
    asyncio's transport held the caller's loop (the simulator's engine loop) for 0.29 s per
    64 MiB on a quiet machine. In a thread the loop only waits for GIL hand-overs, and a blocking
    socket send releases the GIL where asyncio's transport buffer copies under it (an asyncio
    client on a loop in another thread still stalled the caller ~100 ms per 64 MiB; a blocking
    client ~10 ms: bench/kv_loop_lag.py, bench/results/kv_transfer.md). A pool of its own, not the
    loop's default executor, so a slow Redis cannot starve the loop's other blocking work (DNS).

    Failure semantics are the asyncio client's: each round trip fails as `TransferError` within
    `timeout_s` (the caller stops waiting; the thread's socket timeout ends the call itself).
    A round trip carries at most about `round_trip_bytes`, so that deadline says "the store is
    stuck", not "the transfer is large": one pipeline for a handover round of eight 8B-model
    prefixes (768 MiB) could not finish in 2 s and every such handover failed
    (bench/results/scale_handover.md, table 2). A transfer's own bound is its caller's.
    """

    def __init__(self, url: str, *, namespace: str = "default", ttl_s: int = 300, chunk_bytes: int = 512 * 1024,
                 timeout_s: float = 2.0, io_threads: int = 4, round_trip_bytes: int = 8 * 1024 * 1024) -> None:
        # Values are up to a chunk (512 KiB): read the socket in 1 MiB pieces, not redis-py's 64 KiB
        # (block reads +20-30%: bench/results/rerun.md, session 9).
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           socket_read_size=1 << 20)
        self.prefix = f"kvp:{namespace}:blk:"
        self.ttl_s = ttl_s
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.round_trip_bytes = round_trip_bytes
        self._keys_per_trip = max(1, round_trip_bytes // chunk_bytes)   # a value is at most a chunk (+ header)
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix=f"kvpilot-kv-{namespace}")

    async def _io(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the store's threads, as one round trip with its deadline."""
        try:
            job = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except RuntimeError as e:  # the pool is shut down
            raise TransferError(f"{what} failed: the store is closed") from e
        try:
            return await asyncio.wait_for(job, self.timeout_s)
        except (redis.RedisError, OSError, TimeoutError) as e:
            raise TransferError(f"{what} failed: {e or type(e).__name__}") from e

    def _put(self, blocks: list[tuple[str, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, data in blocks:
            k = self.prefix + key
            if len(data) <= self.chunk_bytes:
                pipe.set(k, _HEADER.pack(checksum(data), len(data), 0) + data, ex=self.ttl_s)
                continue
            view = memoryview(data)  # chunks are views: no copy of the block before the socket
            chunks = [view[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)]
            for i, chunk in enumerate(chunks):
                pipe.set(f"{k}:{i}", chunk, ex=self.ttl_s)
            pipe.set(k, _HEADER.pack(checksum(data), len(data), len(chunks)), ex=self.ttl_s)  # header last
        pipe.execute()

    async def put(self, blocks: list[tuple[str, bytes]]) -> None:
        """Blocks in round trips of about `round_trip_bytes` (a larger block is a trip of its own);
        a block's header goes after its chunks, so a reader never sees half a block as whole."""
        what = f"put of {len(blocks)} block(s)"
        group: list[tuple[str, bytes]] = []
        size = 0
        for block in blocks:
            if group and size + len(block[1]) > self.round_trip_bytes:
                await self._io(what, self._put, group)
                group, size = [], 0
            group.append(block)
            size += len(block[1])
        if group:
            await self._io(what, self._put, group)

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        return cast(list[bytes | None], self.client.mget(keys))

    async def _mget_bounded(self, what: str, keys: list[str]) -> list[bytes | None]:
        """MGET in round trips of at most `_keys_per_trip` values."""
        step = self._keys_per_trip
        out: list[bytes | None] = []
        for i in range(0, len(keys), step):
            out += await self._io(what, self._mget, keys[i : i + step])
        return out

    @staticmethod
    def _joined(key: str, parts: list[bytes | None], crc: int, length: int) -> bytes:
        """A chunked block's data, joined and verified (in the thread: both are per byte)."""
        data = b"".join(p or b"" for p in parts)
        if len(data) != length or checksum(data) != crc:
            raise _Corrupt(key, len(data), length)
        return data

    async def get(self, keys: list[str]) -> list[bytes | None]:
        what = f"get of {len(keys)} block(s)"
        try:
            heads = await self._mget_bounded(what, [self.prefix + k for k in keys])
            out: list[bytes | None] = []
            for key, head in zip(keys, heads, strict=True):
                if head is None:
                    out.append(None)
                    continue
                crc, length, chunks = _HEADER.unpack_from(head)
                if chunks:
                    parts = await self._mget_bounded(what, [f"{self.prefix}{key}:{i}" for i in range(chunks)])
                    out.append(await self._io(what, self._joined, key, parts, crc, length))
                    continue
                data = head[_HEADER.size :]
                if len(data) != length or checksum(data) != crc:
                    raise _Corrupt(key, len(data), length)
                out.append(data)
            return out
        except _Corrupt as e:
            raise TransferError(f"block {e.key} is corrupt or incomplete ({e.got}/{e.length} bytes)") from None
        except (struct.error, TypeError) as e:
            raise TransferError(f"{what} failed: {e or type(e).__name__}") from e

    def _delete(self, keys: list[str]) -> None:
        doomed = [self.prefix + k for k in keys]
        for key, head in zip(keys, self._mget(doomed), strict=True):
            if head is not None:
                doomed += [f"{self.prefix}{key}:{i}" for i in range(_HEADER.unpack_from(head)[2])]
        self.client.delete(*doomed)

    async def delete(self, keys: list[str]) -> None:
        """Drop blocks (and their chunks) a reader is done with, instead of waiting for the TTL."""
        step = self._keys_per_trip   # the heads are read first, and an inline head carries its data
        for i in range(0, len(keys), step):
            await self._io(f"delete of {len(keys)} block(s)", self._delete, keys[i : i + step])

    def _exists(self, keys: list[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self.prefix + k)
        return [bool(n) for n in pipe.execute()]

    async def exists(self, keys: list[str]) -> list[bool]:
        """Which blocks are stored (their header key; one pipelined round trip, no data moved)."""
        return await self._io(f"lookup of {len(keys)} block(s)", self._exists, keys)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class _Corrupt(Exception):
    def __init__(self, key: str, got: int, length: int) -> None:
        super().__init__(key)
        self.key, self.got, self.length = key, got, length


class ShardedStore:
    """Blocks spread over several stores (e.g. one Redis per node) by rendezvous hashing of the
    block key: every reader finds a block where its writer put it with no shared state, and adding
    a shard moves only the keys the new shard wins (about 1/n), not a reshuffle of all of them."""

    def __init__(self, shards: list[BlockStore], names: list[str] | None = None) -> None:
        if not shards:
            raise ValueError("a sharded store needs at least one shard")
        self.shards = shards
        self.shard_errors = 0
        self._seeds = [xxhash.xxh64_intdigest(n.encode()) for n in (names or [str(i) for i in range(len(shards))])]

    def shard_of(self, key: str) -> int:
        kb = key.encode()
        return max(range(len(self.shards)), key=lambda i: xxhash.xxh64_intdigest(kb, seed=self._seeds[i]))

    def _split(self, keys: list[str]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for pos, key in enumerate(keys):
            groups.setdefault(self.shard_of(key), []).append(pos)
        return groups

    async def put(self, blocks: list[tuple[str, bytes]]) -> None:
        groups = self._split([k for k, _ in blocks])
        await asyncio.gather(*(self.shards[s].put([blocks[p] for p in ps]) for s, ps in groups.items()))

    async def get(self, keys: list[str]) -> list[bytes | None]:
        groups = self._split(keys)
        results = await asyncio.gather(*(self.shards[s].get([keys[p] for p in ps]) for s, ps in groups.items()))
        out: list[bytes | None] = [None] * len(keys)
        for ps, got in zip(groups.values(), results, strict=True):
            for p, data in zip(ps, got, strict=True):
                out[p] = data
        return out

    async def delete(self, keys: list[str]) -> None:
        groups = self._split(keys)
        await asyncio.gather(*(self.shards[s].delete([keys[p] for p in ps]) for s, ps in groups.items()))

    async def exists(self, keys: list[str]) -> list[bool]:
        """Which blocks are stored; a shard that fails answers "absent" for its keys (a lost shard
        costs its blocks, not the lookup), counted in `shard_errors`. All of them failing raises."""
        groups = self._split(keys)
        results = await asyncio.gather(*(self.shards[s].exists([keys[p] for p in ps]) for s, ps in groups.items()),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, TransferError)]
        if errors and len(errors) == len(self.shards):
            raise errors[0]  # every shard is down: the store is, not just a shard
        out = [False] * len(keys)
        for ps, got in zip(groups.values(), results, strict=True):
            if isinstance(got, BaseException):
                if not isinstance(got, TransferError):
                    raise got
                self.shard_errors += 1
                continue
            for p, hit in zip(ps, got, strict=True):
                out[p] = hit
        return out

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards))


def open_store(urls: str, **options: float | int | str) -> BlockStore:
    """A Redis-backed store from `redis://…`, or sharded over several from a comma-separated list."""
    parts = [u.strip() for u in urls.split(",") if u.strip()]
    if len(parts) == 1:
        return RedisStore(parts[0], **options)  # type: ignore[arg-type]
    return ShardedStore([RedisStore(u, **options) for u in parts], parts)  # type: ignore[arg-type]
