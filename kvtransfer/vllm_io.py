"""The vLLM connector's I/O: kvpilot's `KVAgent` on a private event loop, called from vLLM's threads.

vLLM calls a connector synchronously (the scheduler inside `schedule()`, the worker inside a
step), while the agent and its Redis clients are asyncio. Each process therefore runs one loop
in a daemon thread and submits to it with a deadline. Saves go through a bounded queue to a
second daemon thread, so a step never waits on Redis: a full queue drops the save (a future
miss, counted), a failed save is counted and dropped. After a store error every caller backs off
for `backoff_s` (the scheduler's lookup would otherwise add a timeout to every step while Redis
is down) and treats the store as empty: a miss, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kvpilot.kvtransfer.agent import KVAgent
from kvpilot.kvtransfer.store import BlockDescriptor, TransferError, open_store

log = logging.getLogger("kvpilot.kvtransfer.vllm")
T = TypeVar("T")

COUNTERS = ("lookups", "lookup_errors", "hit_blocks", "loaded_blocks", "loaded_bytes", "failed_loads",
            "saved_blocks", "saved_bytes", "failed_saves", "dropped_saves")


class StoreClient:
    """One process's view of the block store: lookups, loads and (queued) saves, with counters."""

    def __init__(self, urls: str, namespace: str, *, name: str, ttl_s: int = 3600, timeout_s: float = 0.5,
                 backoff_s: float = 2.0, save_queue: int = 64) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvpilot-kv-loop", daemon=True)
        self._thread.start()

        async def make() -> KVAgent:  # the Redis clients belong to the loop that creates them
            return KVAgent(name, open_store(urls, namespace=namespace, ttl_s=ttl_s, timeout_s=timeout_s))

        self.agent = self._run(make(), 10.0)
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._saves: queue.Queue[Callable[[], list[tuple[str, bytes]]] | None] = queue.Queue(save_queue)
        self._saver = threading.Thread(target=self._save_loop, name="kvpilot-kv-saver", daemon=True)
        self._saver.start()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.counts[k] += v

    def take_counts(self) -> dict[str, int]:
        """The counters since the last call (vLLM aggregates them across workers and steps)."""
        with self._lock:
            out, self.counts = self.counts, dict.fromkeys(COUNTERS, 0)
        return out

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, e: BaseException) -> None:
        self._down_until = time.monotonic() + self.backoff_s
        log.warning("kv store %s failed (%s); treating it as empty for %.1f s", what, e or type(e).__name__,
                    self.backoff_s)

    def present(self, keys: list[str]) -> list[bool]:
        """Which keys are stored; all False while the store is down or backing off."""
        if not keys or not self.available():
            return [False] * len(keys)
        self.count(lookups=1)
        try:
            return self._run(self.agent.present(keys), self.timeout_s * 2)
        except (TransferError, TimeoutError, OSError) as e:
            self.count(lookup_errors=1)
            self._failed("lookup", e)
            return [False] * len(keys)

    def load(self, keys: list[str]) -> list[bytes] | None:
        """Every key's value, or None when any is missing, corrupt or the store fails (the caller
        reports those blocks to vLLM, which recomputes them)."""
        if not keys:
            return []

        async def read() -> list[bytes]:  # no checksum to expect: the store verifies its own
            return await self.agent.post_read([BlockDescriptor(k, 0) for k in keys]).wait()

        try:
            got = self._run(read(), self.timeout_s * 4)
        except (TransferError, TimeoutError, OSError) as e:
            self.count(failed_loads=len(keys))
            self._failed("load", e)
            return None
        self.count(loaded_blocks=len(keys), loaded_bytes=sum(len(b) for b in got))
        return got

    def save_later(self, job: Callable[[], list[tuple[str, bytes]]], blocks: int) -> None:
        """Queue a save; `job` makes the (key, value) pairs off the step's thread. Never blocks."""
        try:
            self._saves.put_nowait(job)
        except queue.Full:
            self.count(dropped_saves=blocks)

    def _save_loop(self) -> None:
        while (job := self._saves.get()) is not None:
            try:
                self._save(job)
            finally:
                self._saves.task_done()

    def _save(self, job: Callable[[], list[tuple[str, bytes]]]) -> None:
        try:
            blocks = job()
        except Exception:  # a snapshot that cannot be serialised: drop it, keep serving
            log.exception("kv save job failed")
            return
        if not self.available():
            self.count(dropped_saves=len(blocks))
            return
        keys, values = [k for k, _ in blocks], [v for _, v in blocks]

        async def write() -> None:
            await self.agent.post_write(self.agent.describe(keys, values), values).wait()

        try:
            self._run(write(), self.timeout_s * 4)
        except (TransferError, TimeoutError, OSError) as e:
            self.count(failed_saves=len(blocks))
            self._failed("save", e)
            return
        self.count(saved_blocks=len(blocks), saved_bytes=sum(len(v) for v in values))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued saves are written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._saves.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._saves.unfinished_tasks

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._saves.put_nowait(None)
        with contextlib.suppress(Exception):  # closing a dead store: nothing to keep
            self._run(self.agent.close(), 2.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
