"""`kvpilot sim serve`: the simulator's HTTP server with the extensions a worker offers (live
migration, prefix handover). Wired here so that `kvpilot.sim.server` imports neither."""

from __future__ import annotations

import uvloop
from aiohttp import web

from kvpilot.sim.handover import PrefixEndpoints
from kvpilot.sim.migration import Migrations
from kvpilot.sim.server import ServeConfig, SimServer


def build(cfg: ServeConfig) -> SimServer:
    return SimServer(cfg, extensions=(Migrations, PrefixEndpoints))


def serve(cfg: ServeConfig) -> None:
    uvloop.install()
    web.run_app(build(cfg).app(), host=cfg.host, port=cfg.port, access_log=None, print=None)
