"""The router's request counter by outcome when the client goes away (`kvpilot.router.api`).

aiohttp cancels a handler whose client closed the connection (the router runs with handler
cancellation). A client may close right after a stream's last byte, while the handler is still
releasing its upstream connection: that request was answered and counts `ok`; one cancelled
before its stream ended counts `cancelled`. Before, neither was counted. The real `Api` and runtime
behind an in-process aiohttp server on loopback; the dispatcher is a stand-in, or the real one
relaying a loopback upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from kvpilot import sse
from kvpilot.router.api import Api
from kvpilot.router.config import RouterConfig
from kvpilot.router.dispatch import STREAM_ENDED, Dispatcher
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


def test_a_client_closing_after_done_while_the_upstream_lingers_counts_ok() -> None:
    """The real dispatcher relays an upstream that sends `[DONE]` and then holds its body open; the
    client closes as soon as it has `[DONE]` (as the openai client does), cancelling the handler
    while it still waits for the upstream's end. Seen in CI as one of 36 answered streams counted
    `cancelled`."""
    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse.event({"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}]}))
        await resp.write(sse.DONE[:7])   # the sentinel split across chunks
        await asyncio.sleep(0.05)
        await resp.write(sse.DONE[7:])
        await asyncio.sleep(2.0)
        await resp.write_eof()
        return resp

    async def run() -> dict[str, float]:
        worker = web.Application()
        worker.router.add_post("/v1/completions", upstream)
        async with TestServer(worker) as up:
            runtime = Runtime(RouterConfig.model_validate({"models": [
                {"name": "m", "policy": "round-robin",
                 "endpoints": [{"name": "w0", "url": str(up.make_url("")).rstrip("/")}]}]}))
            dispatcher = Dispatcher(runtime)
            app = web.Application()
            app.add_routes(Api(runtime, dispatcher).public_routes())
            async with TestServer(app) as server, aiohttp.ClientSession() as session:
                dispatcher.session = session
                async with session.post(server.make_url("/v1/completions"),
                                        json={"model": "m", "prompt": "hello", "stream": True}) as resp:
                    got = b""
                    while not got.endswith(sse.DONE):
                        got += await resp.content.readany()
                    resp.close()   # the connection goes with the response: the handler is cancelled
                registry = runtime.metrics.registry

                def count(outcome: str) -> float:
                    return registry.get_sample_value("kvpilot_router_requests_total",
                                                     {"model": "m", "outcome": outcome}) or 0.0
                for _ in range(100):   # the cancelled handler counts on the server's side
                    if count("ok") + count("cancelled"):
                        break
                    await asyncio.sleep(0.01)
                return {o: count(o) for o in ("ok", "cancelled")}

    assert asyncio.run(run()) == {"ok": 1, "cancelled": 0}
