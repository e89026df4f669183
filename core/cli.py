"""The `kvpilot` command. Sub-commands are registered by the components that implement them."""

from __future__ import annotations

import argparse
import sys

from kvpilot import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpilot", description="Kubernetes-native control plane for LLM serving.")
    parser.add_argument("--version", action="version", version=f"kvpilot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from kvpilot.autoscaler.cli import register as register_autoscaler
    from kvpilot.bench_cli import register as register_bench
    from kvpilot.local_cli import register as register_local
    from kvpilot.operator.cli import register as register_operator
    from kvpilot.router.cli import register as register_router
    from kvpilot.sim.cli import register as register_sim

    register_sim(sub)
    register_operator(sub)
    register_router(sub)
    register_autoscaler(sub)
    register_local(sub)
    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = args.handler
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
