"""`kvpilot router`: run the proxy from a config file, or from flags for a quick single-model setup."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvpilot.router.config import RouterConfig


def register(sub: Any) -> None:
    p = sub.add_parser("router", help="the OpenAI-compatible KV-aware routing proxy")
    p.add_argument("--config", type=Path, help="router YAML (models, endpoints, policies, limits)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="router processes sharing the port (one per core)")
    p.add_argument("--model", default="sim-model", help="without --config: the served model name")
    p.add_argument("--policy", default="dualmap", help="without --config: routing policy")
    p.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL[,ROLE]",
                   help="without --config: a worker, e.g. w0=http://127.0.0.1:8001 or p0=http://…,prefill")
    p.add_argument("--mode", choices=["aggregated", "disaggregated"], default="aggregated")
    p.add_argument("--slo-ttft-ms", type=float, default=2000)
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="client API keys and limits (YAML/JSON, e.g. a mounted Secret), re-read when it changes")
    p.add_argument("--admin-host", default=None, help="the admin listener's address (default 127.0.0.1)")
    p.add_argument("--admin-port", type=int, default=None,
                   help="the admin listener: migrate, handover, debug, dashboard (default: --port + 1)")
    p.add_argument("--admin-token-file", type=Path, default=None, help="bearer token the admin endpoints need")
    p.set_defaults(handler=_run)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    if args.config:
        cfg = RouterConfig.load(args.config)
    else:
        endpoints = []
        for spec in args.endpoint:
            name, _, rest = spec.partition("=")
            url, _, role = rest.partition(",")
            if not name or not url:
                raise SystemExit(f"--endpoint {spec!r}: expected NAME=URL[,ROLE]")
            endpoints.append({"name": name, "url": url, "role": role or "both"})
        cfg = RouterConfig.model_validate({"models": [{
            "name": args.model, "policy": args.policy, "mode": args.mode, "endpoints": endpoints,
            "ttftMs": args.slo_ttft_ms}]})
    flags = (("host", args.host), ("port", args.port), ("workers", args.workers),
             ("api_keys_file", args.api_keys_file), ("admin_host", args.admin_host), ("admin_port", args.admin_port),
             ("admin_token_file", args.admin_token_file))
    updates = {k: v for k, v in flags if v is not None}
    return cfg.model_copy(update=updates) if updates else cfg


def _run(args: argparse.Namespace) -> int:
    from kvpilot.router.proxy import serve

    cfg = config_from_args(args)
    if cfg.workers > 1:
        from kvpilot.router.workers import serve_workers

        return serve_workers(cfg, cfg.workers)
    serve(cfg)
    return 0
