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
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("kvpilot.operator")


class Coalescer:
    def __init__(self, delay: float = 0.5, workers: int = 8) -> None:
        self.delay = delay
        self._pending: set[Hashable] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kvpilot-refresh")

    def submit(self, key: Hashable, fn: Callable[[], object]) -> bool:
        """Schedule `fn` for `key` unless it is already scheduled; True when this call scheduled it."""
        with self._lock:
            if key in self._pending:
                return False
            self._pending.add(key)
        context = contextvars.copy_context()
        timer = threading.Timer(self.delay, lambda: self._pool.submit(self._run, key, fn, context))
        timer.daemon = True
        timer.start()
        return True

    def _run(self, key: Hashable, fn: Callable[[], object], context: contextvars.Context) -> None:
        with self._lock:  # from here on a new request schedules a new run: no change is missed
            self._pending.discard(key)
        try:
            context.run(fn)
        except Exception:
            log.exception("refresh of %s failed; the next event or resync retries it", key)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
