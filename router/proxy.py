"""`kvpilot router`: the OpenAI-compatible streaming proxy, assembled from its parts.

Where things are:
- `kvpilot.router.api`: request handling (validation, the OpenAI surface; middlewares go here);
- `kvpilot.router.dispatch`: getting a request answered (picks, retries, P/D, streaming);
- `kvpilot.router.runtime`: per-model state built from the config (pools, KV events, handover);
- `kvpilot.router.loops`: what runs in the background (scraping, the queues' tick, discovery);
- `kvpilot.router.admin`: the operators' endpoints (metrics, dashboard, debug, hooks), on their
  own listener (`adminPort`, with `adminTokenFile`'s bearer token);
- `kvpilot.router.auth`: client API keys and per-key limits (`apiKeysFile`), the admin token;
- `kvpilot.router.policy` / `kvpilot.router.pool`: the routing contract and the pools that drive it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from kvpilot import logs
from kvpilot.router.admin import Admin
from kvpilot.router.api import Api
from kvpilot.router.auth import FileToken, KeyStore, admin_token_middleware, api_key_middleware
from kvpilot.router.config import RouterConfig
from kvpilot.router.dispatch import Dispatcher
from kvpilot.router.loops import Background
from kvpilot.router.runtime import Runtime

log = logging.getLogger("kvpilot.router")
RUNTIME = web.AppKey("runtime", Runtime)
ADMIN_APP = web.AppKey("admin_app", web.Application)
ADMIN_RUNNER = web.AppKey("admin_runner", web.AppRunner)


def client_middlewares(cfg: RouterConfig) -> list[Middleware]:
    """The API-key check when a keys file is configured."""
    if cfg.api_keys_file is None:
        return []
    return [api_key_middleware(KeyStore(cfg.api_keys_file, cfg.api_keys_reload_s))]


def build_admin_app(cfg: RouterConfig, admin: Admin) -> web.Application:
    """The operators' endpoints, behind the admin token when one is configured."""
    token = FileToken(cfg.admin_token_file, cfg.api_keys_reload_s) if cfg.admin_token_file else (lambda: None)
    if cfg.admin_token_file is None and cfg.admin_host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("admin endpoints on %s without a token: anyone who reaches the port can migrate requests "
                    "and read the dashboard (set adminTokenFile)", cfg.admin_host)
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[admin_token_middleware(token)])
    app.add_routes(admin.routes())
    return app


def build_app(cfg: RouterConfig, middlewares: Iterable[Middleware] = (), worker: int = 0) -> web.Application:
    """The router's client app over one runtime; the admin app (`ADMIN_APP`) is served beside it
    on `cfg.admin_listen_port()` (+ `worker`: each of `--workers` processes has its own, since a
    migration must reach the process holding the stream) from the client app's start-up.
    `middlewares` wrap every client handler in order, after the configured API-key check."""
    runtime = Runtime(cfg)
    dispatcher = Dispatcher(runtime)
    background = Background(runtime)

    async def on_startup(app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=cfg.connect_timeout_s)
        session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        dispatcher.session = session
        background.start(session)
        runtime.migrator.start(session)
        runtime.handovers.start(session)
        runner = web.AppRunner(app[ADMIN_APP], access_log=None, handler_cancellation=True)
        await runner.setup()
        admin_port = cfg.admin_listen_port()
        await web.TCPSite(runner, cfg.admin_host, admin_port + worker if admin_port else 0).start()
        app[ADMIN_RUNNER] = runner

    async def on_cleanup(app: web.Application) -> None:
        if ADMIN_RUNNER in app:
            await app[ADMIN_RUNNER].cleanup()
        background.stop()
        runtime.migrator.stop()
        if dispatcher.session is not None:
            await dispatcher.session.close()

    app = web.Application(client_max_size=cfg.max_body_bytes,
                          middlewares=[*client_middlewares(cfg), *middlewares])
    app[RUNTIME] = runtime
    admin = Admin(runtime)
    app[ADMIN_APP] = build_admin_app(cfg, admin)
    app.add_routes(Api(runtime, dispatcher).public_routes())
    app.add_routes([admin.metrics_route()])
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def serve(cfg: RouterConfig) -> None:
    import uvloop

    uvloop.install()
    logs.setup(cfg.log_level, cfg.log_format)
    web.run_app(build_app(cfg), host=cfg.host, port=cfg.port, access_log=None, print=None,
                handler_cancellation=True)
