"""The router's request counter by outcome when the client goes away (`kvpilot.router.api`).

aiohttp cancels a handler whose client closed the connection (the router runs with handler
cancellation). A client may close right after a stream's last byte, while the handler is still
releasing its upstream connection: that request was answered and counts `ok`; one cancelled
before its stream ended counts `cancelled`. Before, neither was counted. The real `Api` and runtime
behind an in-process aiohttp server on loopback; the dispatcher is the stand-in."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from kvpilot.router.api import Api
from kvpilot.router.config import RouterConfig
from kvpilot.router.dispatch import STREAM_ENDED
from kvpilot.router.runtime import Runtime


class Cancelled:
    """Stands in for the dispatcher: the handler is cancelled, after the stream ended or before."""

    def __init__(self, ended: bool) -> None:
        self.ended = ended

    async def run(self, request: web.Request, *_: Any) -> web.StreamResponse:
        if self.ended:
            request[STREAM_ENDED] = True
        raise asyncio.CancelledError


def _counted(ended: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        runtime = Runtime(RouterConfig.model_validate({"models": [
            {"name": "m", "policy": "round-robin", "endpoints": [{"name": "w0", "url": "http://127.0.0.1:9"}]}]}))
        dispatcher: Any = Cancelled(ended)
        api = Api(runtime, dispatcher)
        app = web.Application()
        app.add_routes(api.public_routes())
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            try:
                async with session.post(server.make_url("/v1/completions"),
                                        json={"model": "m", "prompt": "hello", "stream": True}) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass   # the cancelled handler answers nothing
        registry = runtime.metrics.registry
        return {outcome: registry.get_sample_value("kvpilot_router_requests_total", {"model": "m", "outcome": outcome})
                or 0.0 for outcome in ("ok", "cancelled")}

    return asyncio.run(run())


def test_a_handler_cancelled_after_its_stream_ended_counts_ok() -> None:
    assert _counted(ended=True) == {"ok": 1, "cancelled": 0}


def test_a_handler_cancelled_before_its_stream_ended_counts_cancelled() -> None:
    assert _counted(ended=False) == {"ok": 0, "cancelled": 1}
