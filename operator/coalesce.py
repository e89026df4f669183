"""Coalescing: run a refresh once per key shortly after it is asked for, however often it is asked meanwhile.

A new pool's Deployment changes status four or five times within a second or two, and each change
used to cost the owning LLMService a full status refresh (a get, a list, a get and maybe a patch).
Status is level-triggered, so one refresh after the flurry gives the same result with a fraction
of the apiserver requests. The work runs on an executor (kopf's handler executor in the operator), in
the context of the handler that asked (kopf's event posting needs it).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, ThreadPoolExecutor

log = logging.getLogger("kvpilot.operator")


class Coalescer:
    """`executor`: where the refreshes run. The operator passes kopf's handler executor, so
    `--max-workers` bounds handlers and refreshes together; without one, a pool of `workers` threads.

    One waiting thread for all pending keys: every key waits the same delay, so the keys fall due in
    the order they were asked for and a FIFO of deadlines is the whole schedule (a `threading.Timer`
    per key made a burst of 100 services 100 sleeping threads)."""

    def __init__(self, delay: float = 0.5, workers: int = 8, executor: Executor | None = None) -> None:
        self.delay = delay
        self._due: deque[tuple[float, Hashable, Callable[[], object], contextvars.Context]] = deque()
        self._pending: set[Hashable] = set()  # waiting or queued on the executor, until its run starts
        self._cond = threading.Condition()
        self._closed = False
        self._own = executor is None
        self._pool = executor or ThreadPoolExecutor(workers, thread_name_prefix="kvpilot-refresh")
        self._waiter = threading.Thread(target=self._wait, name="kvpilot-coalescer", daemon=True)
        self._waiter.start()

    def submit(self, key: Hashable, fn: Callable[[], object]) -> bool:
        """Schedule `fn` for `key` unless it is already scheduled or the coalescer is shut down; True
        when this call scheduled it."""
        context = contextvars.copy_context()
        with self._cond:
            if self._closed or key in self._pending:
                return False
            self._pending.add(key)
            self._due.append((time.monotonic() + self.delay, key, fn, context))
            self._cond.notify()
        return True

    def _wait(self) -> None:
        """Hand each key to the executor when its delay is up; end at shutdown."""
        while True:
            with self._cond:
                while not self._closed and (not self._due or self._due[0][0] > time.monotonic()):
                    self._cond.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._closed:
                    return
                _, key, fn, context = self._due.popleft()
            try:
                self._pool.submit(self._run, key, fn, context)
            except RuntimeError:  # the executor is shutting down (kopf's, at exit)
                with self._cond:
                    self._pending.discard(key)

    def _run(self, key: Hashable, fn: Callable[[], object], context: contextvars.Context) -> None:
        with self._cond:  # from here on a new request schedules a new run: no change is missed
            self._pending.discard(key)
        try:
            context.run(fn)
        except Exception:
            log.exception("refresh of %s failed; the next event or resync retries it", key)

    def pending(self) -> int:
        """Keys scheduled and not yet started."""
        with self._cond:
            return len(self._pending)

    def shutdown(self) -> None:
        """Drop every key still waiting, end the waiting thread and stop accepting work; refreshes
        already running finish. An executor passed in belongs to its owner and is left running."""
        with self._cond:
            self._closed = True
            self._due.clear()
            self._pending.clear()
            self._cond.notify()
        self._waiter.join(1)
        if self._own:
            self._pool.shutdown(wait=False, cancel_futures=True)
