"""`kvpilot operator run`: the kopf operator in this process, against $KUBECONFIG or the pod's account."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import socket
from typing import Any, cast


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
                         help="kopf peering object shared by replicas (a ClusterKopfPeering, or a KopfPeering in "
                              "each watched namespace; it must exist); only the highest priority replica acts")
    run.add_argument("--priority", type=int,
                     help="peering priority of this replica (default: random, so replicas never tie: kopf pauses "
                          "every replica of a tie)")
    run.add_argument("--peering-lifetime", type=int, default=60,
                     help="seconds a replica that stopped without saying so still counts as alive")
    run.add_argument("--no-pod-monitors", dest="pod_monitors", action="store_false",
                     help="never create PodMonitors (by default: one per LLMService when the Prometheus "
                          "Operator's CRDs exist)")
    run.add_argument("--image", help="image with the kvpilot command, for routers and simulator engines (default: this "
                          "version's); vLLM engines run their spec's image")
    run.add_argument("--pod-defaults", type=_json_object, default=None, metavar="JSON",
                     help="what every engine and router pod gets: {imagePullSecrets: [names], priorityClassName, "
                          "extraVolumes, extraVolumeMounts, modelCache: {existingClaim | hostPath}} (the chart's "
                          "`workloads` values)")
    run.add_argument("--resync-seconds", type=float, default=60.0, help="periodic full reconcile interval")
    run.add_argument("--liveness", help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (all interfaces)")
    run.add_argument("--max-workers", type=int, default=16,
                     help="threads running handlers: at most this many objects reconciled at once (protects "
                          "the API server during a burst of changes)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(handler=_run)


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _run(args: argparse.Namespace) -> int:
    import kopf

    from kvpilot.operator.handlers import LIFECYCLE  # importing registers the handlers with kopf
    from kvpilot.operator.peers import Me

    priority = args.priority if args.priority is not None else random.SystemRandom().randint(1, 2**31 - 1)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    kopf.configure(verbose=args.log_level == "DEBUG", quiet=args.log_level in ("WARNING", "ERROR"),
                   log_prefix=True)  # each line about an object names it: [namespace/name]
    me = None if args.standalone else Me(args.peering, f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}",
                                         priority)
    if me is not None:
        logging.getLogger("kvpilot.operator").info("peering %r as %s with priority %d", me.peering, me.identity,
                                                   priority)
    from kvpilot.operator.poddefaults import PodDefaults

    memo = kopf.Memo(image=args.image, defaults=PodDefaults.parse(args.pod_defaults),
                     namespaces=args.namespace, monitors=args.pod_monitors, me=me,
                     peering_lifetime=args.peering_lifetime, resync_seconds=args.resync_seconds,
                     max_workers=max(1, args.max_workers))
    kopf.run(clusterwide=not args.namespace, namespaces=args.namespace, standalone=args.standalone,
             peering_name=None if me is None else me.peering, priority=priority,
             identity=None if me is None else cast(Any, me.identity),  # kopf types it as a NewType of str
             liveness_endpoint=args.liveness, memo=memo, lifecycle=LIFECYCLE)
    return 0
