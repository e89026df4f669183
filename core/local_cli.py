"""`kvpilot up` and `kvpilot demo`."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any


def time_scale(text: str) -> float:
    """An argparse type for `--time-scale`: a finite number above zero. Zero used to mean "the
    default" by accident (`time_scale or DEFAULT`), and a negative one would run time backwards."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number (workers run N× faster), got {text}")
    return value


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="the control plane on this machine: simulated GPU workers and the router")
    up.add_argument("-f", "--file", type=Path, help="an LLMService YAML (default: a built-in 4-GPU Llama-8B)")
    up.add_argument("--port", type=int, help="the router's port (default: a free one)")
    up.add_argument("--time-scale", type=time_scale, default=1.0, help="workers run N× faster than the hardware")
    up.add_argument("--prometheus", action="store_true",
                    help="also run Debian's Prometheus scraping every process with kvpilot's rules, and a viewer "
                         "of the Grafana dashboards (deploy/dashboards) drawn from it")
    up.add_argument("--scrape-interval", default="5s", help="Prometheus' scrape and rule interval (--prometheus)")
    up.set_defaults(handler=_up)
    demo = sub.add_parser("demo", help="`up` under a replayed Mooncake trace: DualMap vs round-robin")
    demo.add_argument("-f", "--file", type=Path)
    demo.add_argument("--requests", type=int, default=300)
    demo.add_argument("--time-scale", type=time_scale, default=None,
                      help="workers run N× faster than the GPUs they model (default: kvpilot.demo.DEMO_TIME_SCALE, "
                           "what two cores carry)")
    demo.add_argument("--rate", type=float, default=1.0,
                      help="load as a multiple of the workload's rate (Mooncake: the trace's; generated: 10 req/s)")
    demo.add_argument("--workload", default="mooncake", choices=["mooncake", "agentic", "chat", "rag", "no-reuse"],
                      help="what to replay: the Mooncake trace's head, or a generated workload (kvpilot.sim.families)")
    demo.add_argument("--policies", nargs="+", default=["dualmap", "round-robin"])
    demo.add_argument("--out", type=Path, default=Path("kvpilot-demo"), help="where the PNG plots go")
    demo.set_defaults(handler=_demo)


def _up(args: argparse.Namespace) -> int:
    from kvpilot.local import LocalControlPlane, load_service

    with LocalControlPlane(load_service(args.file), time_scale=args.time_scale, port=args.port,
                           prometheus=args.prometheus, scrape_interval=args.scrape_interval) as plane:
        # Block only now: children inherit the signal mask, and they must still die on SIGTERM.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        scaling = "autoscaled" if plane.autoscale else "fixed size"
        print(f"kvpilot is up: OpenAI base URL {plane.url}/v1, model {plane.model!r}, "
              f"{len(plane.workers)} simulated worker(s), {scaling}; dashboard {plane.admin_url}/dashboard; "
              f"logs in {plane.dir}. Ctrl-C stops everything.", flush=True)
        if plane.monitoring is not None:
            print(f"Prometheus {plane.monitoring.url} (kvpilot's rules loaded); Grafana dashboards drawn from it "
                  f"at {plane.monitoring.viewer_url}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    print("stopped", flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kvpilot.demo import run_demo

    results = run_demo(args.file, requests=args.requests, policies=tuple(args.policies),
                       time_scale=args.time_scale, rate_multiplier=args.rate, out_dir=args.out,
                       workload=args.workload)
    return 0 if all(r.ttft for r in results) else 1
