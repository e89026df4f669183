"""`kvpilot operator run`: the kopf operator in this process, against $KUBECONFIG or the pod's account."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    op = sub.add_parser("operator", help="the Kubernetes operator (LLMService → WorkerPools → Deployments)")
    opsub = op.add_subparsers(dest="operator_command", metavar="SUBCOMMAND", required=True)
    run = opsub.add_parser("run", help="reconcile LLMServices until stopped")
    run.add_argument("-n", "--namespace", action="append", default=[],
                     help="watch only this namespace (repeatable); default: the whole cluster")
    peering = run.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true",
                         help="do not coordinate with other replicas (one replica, or tests)")
    peering.add_argument("--peering", default="kvpilot",
                         help="kopf peering object shared by replicas; only the highest priority one acts")
    run.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    run.add_argument("--image", help="image with the kvpilot command, for routers (default: this version's)")
    run.add_argument("--resync-seconds", type=float, default=60.0, help="periodic full reconcile interval")
    run.add_argument("--liveness", help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (all interfaces)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import kopf

    import kvpilot.operator.handlers  # noqa: F401  (registers the handlers with kopf)

    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    kopf.configure(verbose=args.log_level == "DEBUG", quiet=args.log_level in ("WARNING", "ERROR"))
    memo = kopf.Memo(image=args.image, namespaces=args.namespace, resync_seconds=args.resync_seconds)
    kopf.run(clusterwide=not args.namespace, namespaces=args.namespace, standalone=args.standalone,
             peering_name=None if args.standalone else args.peering, priority=args.priority,
             liveness_endpoint=args.liveness, memo=memo)
    return 0
