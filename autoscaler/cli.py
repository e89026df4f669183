"""`kvpilot autoscaler run`: one autoscaler for every LLMService in scope, against the Kubernetes API."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

log = logging.getLogger("kvpilot.autoscaler")


def register(sub: Any) -> None:
    top = sub.add_parser("autoscaler", help="SLO-aware autoscaler for LLMService pools")
    asub = top.add_subparsers(dest="autoscaler_command", metavar="SUBCOMMAND", required=True)
    run = asub.add_parser("run", help="size WorkerPools every interval until stopped")
    run.add_argument("-n", "--namespace", action="append", default=[],
                     help="only this namespace (repeatable; default: the whole cluster)")
    run.add_argument("--interval", type=float, default=10.0, help="seconds between decisions")
    run.add_argument("--cold-start", type=float, default=60.0,
                     help="seconds a new replica takes to serve; demand is forecast this far ahead")
    run.add_argument("--pending-deadline", type=float, default=120.0,
                     help="seconds a pod may wait unscheduled before it counts as no GPU for it (not as starting)")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    run.add_argument("--prometheus-url",
                     help="the Prometheus that services with spec.autoscaling.metricsSource: prometheus are read "
                          "from by PromQL (their pods' series labelled namespace and pod, as Kubernetes discovery "
                          "does); services with metricsSource: pods (the default) are scraped directly")
    run.add_argument("--leader-elect", action="store_true",
                     help="run as one of several replicas: only the holder of a coordination.k8s.io Lease acts")
    run.add_argument("--lease-name", default="kvpilot-autoscaler", help="the Lease's name")
    run.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                     help="the Lease's namespace (default: $POD_NAMESPACE, else default)")
    run.add_argument("--lease-duration", type=int, default=15,
                     help="seconds without a renewal after which a standby takes over")
    run.add_argument("--identity", default=os.environ.get("POD_NAME", socket.gethostname()),
                     help="this replica's name in the Lease (default: $POD_NAME, else the host name)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--log-format", default="json", choices=["json", "text"])
    run.set_defaults(handler=_run)


def _services(custom: Any, namespaces: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    from kvpilot.crds import API_VERSION

    group, version = API_VERSION.split("/")
    if namespaces:
        items = [o for ns in namespaces
                 for o in custom.list_namespaced_custom_object(group, version, ns, "llmservices")["items"]]
    else:
        items = custom.list_cluster_custom_object(group, version, "llmservices")["items"]
    return [(o["metadata"]["namespace"], o["metadata"]["name"], o.get("spec") or {}) for o in items]


def _write_status(custom: Any, decisions: list[Any], written: dict[tuple[str, str, str], tuple[Any, ...]]) -> None:
    """One status patch per service whose decisions changed: `status.autoscaling.<role>` = the
    last decision. Unchanged holds are not rewritten, so a steady pool costs the API nothing."""
    from kvpilot.crds import API_VERSION

    group, version = API_VERSION.split("/")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    by_service: dict[tuple[str, str], dict[str, Any]] = {}
    for d in decisions:
        key = (d.pool.namespace, d.pool.service, d.pool.role)
        value = (d.desired, d.asked, d.ready, d.reason, d.metrics_source)
        if written.get(key) == value:
            continue
        written[key] = value
        by_service.setdefault((d.pool.namespace, d.pool.service), {})[d.pool.role] = {
            "desired": d.desired, "current": d.asked, "ready": d.ready, "reason": d.reason,
            "metricsSource": d.metrics_source, "lastDecisionTime": stamp}
    for (ns, name), pools in by_service.items():
        try:
            custom.patch_namespaced_custom_object_status(group, version, ns, "llmservices", name,
                                                         {"status": {"autoscaling": pools}})
        except Exception as err:
            log.warning("status of %s/%s not written: %s", ns, name, err)


def _run(args: argparse.Namespace) -> int:
    from kubernetes import client

    from kvpilot.autoscaler.actuators import KubernetesActuator
    from kvpilot.autoscaler.controller import Autoscaler, Metrics
    from kvpilot.autoscaler.planner import PlannerConfig
    from kvpilot.kubeconfig import load_client
    from kvpilot.logs import setup as setup_logging

    setup_logging(args.log_level, args.log_format)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    api = load_client()
    custom = client.CustomObjectsApi(api)
    scaler = Autoscaler(KubernetesActuator(api, pending_deadline_s=args.pending_deadline), metrics=Metrics(),
                        base=PlannerConfig(forecast_s=2 * args.cold_start + args.interval),
                        prometheus_url=args.prometheus_url)
    stop = threading.Event()
    written: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    elector = None
    if args.leader_elect:
        from kvpilot.autoscaler.leader import LeaseElector

        elector = LeaseElector(api, args.lease_namespace, args.lease_name, args.identity, args.lease_duration)
    log.info("autoscaler started", extra={"namespaces": args.namespace or ["*"], "interval": args.interval,
                                          "leader_elect": args.leader_elect})
    # The lease is renewed at a third of its duration, decisions are taken every interval.
    beat = min(args.interval, args.lease_duration / 3) if elector else args.interval
    last = -float("inf")
    while not stop.is_set():
        try:
            leading = elector.acquire() if elector else True
            if leading and time.monotonic() - last >= args.interval - 1e-3:
                last = time.monotonic()
                decisions = scaler.tick(_services(custom, args.namespace))
                _write_status(custom, decisions, written)
            elif not leading:
                last = -float("inf")   # a new leader decides at once
        except Exception:
            log.exception("autoscaler interval failed")
        stop.wait(beat)
    return 0
