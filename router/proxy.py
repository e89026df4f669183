"""`kvpilot router`: the OpenAI-compatible streaming proxy, assembled from its parts.

Where things are:
- `kvpilot.router.api`: request handling (validation, the OpenAI surface; middlewares go here);
- `kvpilot.router.dispatch`: getting a request answered (picks, retries, P/D, streaming);
- `kvpilot.router.runtime`: per-model state built from the config (pools, KV events, handover);
- `kvpilot.router.loops`: what runs in the background (scraping, the queues' tick, discovery);
- `kvpilot.router.admin`: the operators' endpoints (metrics, dashboard, debug, hooks);
- `kvpilot.router.policy` / `kvpilot.router.pool`: the routing contract and the pools that drive it.
"""

from __future__ import annotations

from collections.abc import Iterable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from kvpilot import logs
from kvpilot.router.admin import Admin
from kvpilot.router.api import Api
from kvpilot.router.config import RouterConfig
from kvpilot.router.dispatch import Dispatcher
from kvpilot.router.loops import Background
from kvpilot.router.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)


def build_app(cfg: RouterConfig, middlewares: Iterable[Middleware] = ()) -> web.Application:
    """The router's aiohttp app: client and operator routes over one runtime. `middlewares` wrap
    every handler (an API-key check, say) in order."""
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

    async def on_cleanup(app: web.Application) -> None:
        background.stop()
        runtime.migrator.stop()
        if dispatcher.session is not None:
            await dispatcher.session.close()

    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=list(middlewares))
    app[RUNTIME] = runtime
    app.add_routes(Api(runtime, dispatcher).public_routes())
    app.add_routes(Admin(runtime).routes())
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def serve(cfg: RouterConfig) -> None:
    import uvloop

    uvloop.install()
    logs.setup(cfg.log_level, cfg.log_format)
    web.run_app(build_app(cfg), host=cfg.host, port=cfg.port, access_log=None, print=None,
                handler_cancellation=True)
