"""Coalescing: run a refresh once per key shortly after it is asked for, however often it is asked meanwhile.

A new pool's Deployment changes status four or five times within a second or two, and each change
used to cost the owning LLMService a full status refresh (a get, a list, a get and maybe a patch).
Status is level-triggered, so one refresh after the flurry gives the same result with a fraction
of the apiserver requests. The work runs in a small pool of its own threads, in the context of the
handler that asked (kopf's event posting needs it).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, ThreadPoolExecutor

log = logging.getLogger("kvpilot.operator")


class Coalescer:
    """`executor`: where the refreshes run. The operator passes kopf's handler executor, so
    `--max-workers` bounds handlers and refreshes together; without one, a pool of `workers` threads."""

    def __init__(self, delay: float = 0.5, workers: int = 8, executor: Executor | None = None) -> None:
        self.delay = delay
        self._timers: dict[Hashable, threading.Timer] = {}  # a key is pending while it has a timer here
        self._lock = threading.Lock()
        self._closed = False
        self._own = executor is None
        self._pool = executor or ThreadPoolExecutor(workers, thread_name_prefix="kvpilot-refresh")

    def submit(self, key: Hashable, fn: Callable[[], object]) -> bool:
        """Schedule `fn` for `key` unless it is already scheduled or the coalescer is shut down; True
        when this call scheduled it."""
        context = contextvars.copy_context()
        with self._lock:
            if self._closed or key in self._timers:
                return False
            timer = threading.Timer(self.delay, self._fire, (key, fn, context))
            timer.daemon = True
            self._timers[key] = timer
            timer.start()
        return True

    def _fire(self, key: Hashable, fn: Callable[[], object], context: contextvars.Context) -> None:
        with self._lock:
            if self._closed:
                return
        try:
            self._pool.submit(self._run, key, fn, context)
        except RuntimeError:  # the executor is shutting down (kopf's, at exit)
            with self._lock:
                self._timers.pop(key, None)

    def _run(self, key: Hashable, fn: Callable[[], object], context: contextvars.Context) -> None:
        with self._lock:  # from here on a new request schedules a new run: no change is missed
            self._timers.pop(key, None)
        try:
            context.run(fn)
        except Exception:
            log.exception("refresh of %s failed; the next event or resync retries it", key)

    def pending(self) -> int:
        """Keys scheduled and not yet started."""
        with self._lock:
            return len(self._timers)

    def shutdown(self) -> None:
        """Cancel every timer still waiting and stop accepting work; refreshes already running finish.
        An executor passed in belongs to its owner and is left running."""
        with self._lock:
            self._closed = True
            timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()
        if self._own:
            self._pool.shutdown(wait=False, cancel_futures=True)
