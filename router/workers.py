"""`kvpilot router --workers N`: N router processes behind one listening port.

One Python process saturates one core (≈ 1,000 streaming req/s, bench/results/router_overhead.md),
so a router pod runs N worker processes that each bind the client port with `SO_REUSEPORT`: the
kernel spreads incoming connections over them, with no acceptor process in between. Each worker is
a full, independent router replica in the sense of active-active replicas (router/engine_load.py):
the same rings from the same membership, its own in-flight counts, the engines' load from its own
polls. Nothing is shared between workers, so nothing has to be locked.

What is per process: every stream a worker proxies (and so the migration of it), its router-side
queues, its hot-prefix table and its metrics. Calls that must reach one process therefore have an
address per process: worker i serves the client app on its own port too (`workerPorts[i]`,
default: the client port + 1 + N + i), scraped for `/metrics` on its own, and its admin app on
the admin port + i. `POST /kvpilot/migrate {"request_id"}` goes to each worker's admin port in
turn and is answered by the one that holds the stream (the others answer 404). Scale-event
handovers need no address: every worker sees the membership change itself and plans its own.

The parent only starts the workers and watches them: when one exits, the others are stopped and
the parent exits non-zero, so the pod restarts whole rather than running on with fewer cores.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys
from multiprocessing.connection import wait
from types import FrameType

from aiohttp import web

from kvpilot import logs
from kvpilot.router.config import RouterConfig


def worker_port(cfg: RouterConfig, index: int) -> int:
    """Worker `index`'s own port: where calls for its streams and its metrics go."""
    return cfg.worker_ports[index] if cfg.worker_ports else cfg.port + 1 + cfg.workers + index


async def _serve(cfg: RouterConfig, index: int) -> None:
    from kvpilot.router.proxy import build_app

    runner = web.AppRunner(build_app(cfg, worker=index), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, cfg.host, cfg.port, reuse_port=True).start()
    await web.TCPSite(runner, cfg.host, worker_port(cfg, index)).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def _worker(cfg: RouterConfig, index: int) -> None:
    import uvloop

    logs.setup(cfg.log_level, cfg.log_format)
    uvloop.run(_serve(cfg, index))


def serve_workers(cfg: RouterConfig, workers: int) -> int:
    """Run `workers` router processes on `cfg.port` until a signal or until one of them exits."""
    if cfg.port == 0:
        raise SystemExit("--workers needs a fixed port: each worker binds it with SO_REUSEPORT")
    ctx = multiprocessing.get_context("spawn")   # a fresh interpreter each: no event loop inherited
    procs = [ctx.Process(target=_worker, args=(cfg, i), name=f"router-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wait([p.sentinel for p in procs])   # the first to exit (or all, after a signal)
    stop(signal.SIGTERM, None)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    print(f"router workers exited: {codes}", file=sys.stderr)
    return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
