"""The router's credentials, as aiohttp middlewares: client API keys and the admin token.

Keys come from a file (a mounted Kubernetes Secret, format in `kvpilot.router.keys`) that is
re-read when it changes: at most every `reload_s` a request stats it (one `os.stat`, no background
task), and reads it again when its mtime, size or inode moved (a Secret update swaps a symlink).
A revoked key is therefore refused within `reload_s` of the kubelet writing the file. A file that
no longer parses keeps the last good keys (logged); a file that is gone refuses every key.

Logs name a key by its `name`, never the key itself; nothing here logs request bodies.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from kvpilot.openai_errors import ApiError
from kvpilot.router.keys import KeysFile, KeyTable, Limiter

log = logging.getLogger("kvpilot.router.auth")

Clock = Callable[[], float]


def bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class KeyStore:
    """The key table from `path`, refreshed when the file changes."""

    def __init__(self, path: Path, reload_s: float = 2.0, clock: Clock = time.monotonic) -> None:
        self.path, self.reload_s, self.clock = path, reload_s, clock
        self.table = KeyTable([])
        self.names: set[str] = set()
        self.generation = 0   # bumped on every change of the table
        self._signature: tuple[int, int, int] | None = None
        self._checked = -float("inf")
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._checked < self.reload_s:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._signature is not None or force:
                log.error("API keys file %s unreadable (%s): refusing every key", self.path, e.strerror)
            self.table, self.names, self._signature = KeyTable([]), set(), None
            self.generation += 1
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            return
        try:
            keys = KeysFile.parse(yaml.safe_load(self.path.read_text())).keys
        except (OSError, ValueError, yaml.YAMLError) as e:
            # No message from the parser: it could quote a key.
            log.error("API keys file %s is invalid (%s); keeping the %d keys read before",
                      self.path, type(e).__name__, len(self.names))
            self._signature = signature
            return
        self.table, self.names, self._signature = KeyTable(keys), {k.name for k in keys}, signature
        self.generation += 1
        log.info("API keys loaded: %s", ", ".join(sorted(self.names)) or "none")


def _unauthorized(message: str) -> web.Response:
    return ApiError(401, message, "invalid_request_error", None, "invalid_api_key").response()


def api_key_middleware(store: KeyStore, limiter: Limiter | None = None, clock: Clock = time.monotonic,
                       prefix: str = "/v1/") -> Middleware:
    """Requests under `prefix` need `Authorization: Bearer <key>` of a listed key (else 401) and
    within that key's limits (else 429 with Retry-After). Health checks and /metrics stay open."""
    limiter = limiter or Limiter()
    seen = [store.generation]

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(prefix):
            return await handler(request)
        store.refresh()
        presented = bearer(request)
        if presented is None:
            return _unauthorized("You didn't provide an API key: send `Authorization: Bearer <key>`.")
        spec = store.table.lookup(presented)
        if spec is None:
            return _unauthorized("Incorrect API key provided.")
        if seen[0] != store.generation:   # keys removed from the file: drop their limits' state
            limiter.forget(store.names)
            seen[0] = store.generation
        denied = limiter.admit(spec, clock())
        if denied is not None:
            log.info("rate limited: %s", denied.reason, extra={"api_key": spec.name})
            return ApiError(429, denied.reason, "rate_limit_error", None, "rate_limit_exceeded",
                            retry_after=str(denied.retry_after_s)).response()
        try:
            return await handler(request)
        finally:
            limiter.release(spec)

    return check_key


def read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise SystemExit(f"admin token file {path} is empty")
    return token


def admin_token_middleware(token: Callable[[], str | None]) -> Middleware:
    """Every admin request needs `Authorization: Bearer <token>` when a token is set (`token()` is
    asked per request, so a rotated Secret takes effect without a restart)."""

    @web.middleware
    async def check_admin(request: web.Request, handler: Handler) -> web.StreamResponse:
        expected = token()
        if expected is not None:
            presented = bearer(request) or ""
            if not hmac.compare_digest(presented.encode(), expected.encode()):
                return _unauthorized("admin endpoints need `Authorization: Bearer <admin token>`")
        return await handler(request)

    return check_admin


class FileToken:
    """The admin token in a file, re-read at most every `reload_s` (a rotated Secret applies
    without a restart); calling it gives the current token."""

    def __init__(self, path: Path, reload_s: float = 2.0, clock: Clock = time.monotonic) -> None:
        self.path, self.reload_s, self.clock = path, reload_s, clock
        self.token, self.at = read_token(path), clock()

    def __call__(self) -> str | None:
        now = self.clock()
        if now - self.at >= self.reload_s:
            self.at = now
            try:
                self.token = read_token(self.path)
            except (OSError, SystemExit):
                log.error("admin token file %s unreadable; keeping the token read before", self.path)
        return self.token
