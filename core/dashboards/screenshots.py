"""`python -P -m kvpilot.dashboards.screenshots`: the dashboards under the demo workload, as PNGs.

Runs `kvpilot up --prometheus` (its own process) with the built-in service (DualMap, autoscaled) at
the demo's speed, replays the first requests of the Mooncake conversation trace through it as
`kvpilot demo` does, then has headless Chromium draw each dashboard from Prometheus into docs/img/
(the operator's needs a cluster: local mode runs no operator).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

from rich.progress import Progress

from kvpilot.dashboards.browser import panel_status, screenshot
from kvpilot.dashboards.queries import REPO
from kvpilot.procs import ManagedProcess, wait_for

SHOTS = {"kvpilot-service": "dashboard-service-overview.png", "kvpilot-autoscaling": "dashboard-autoscaling.png",
         "kvpilot-router": "dashboard-router-cache.png"}


def main(argv: list[str] | None = None) -> int:
    from kvpilot.demo import RunResult, replay
    from kvpilot.local import load_service
    from kvpilot.sim.workload import mooncake

    parser = argparse.ArgumentParser(prog="python -P -m kvpilot.dashboards.screenshots", description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--time-scale", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="kvpilot-shots-"))
    # Its own process, as a user runs it: the load generator here must not starve its autoscaler.
    up = ManagedProcess("kvpilot-up", [sys.executable, "-P", "-m", "kvpilot.cli", "up", "--prometheus",
                                       "--time-scale", str(args.time_scale), "--scrape-interval", "2s"],
                        workdir / "up.log")
    try:
        wait_for(lambda: "Grafana dashboards" in up.log_path.read_text(), 90, "kvpilot up", up)
        log = up.log_path.read_text()
        base = re.search(r"OpenAI base URL (\S+)/v1", log)
        viewer = re.search(r"drawn from it at (\S+)", log)
        assert base is not None and viewer is not None, log
        service = load_service(None)
        result = RunResult("dualmap")
        with Progress() as progress:
            asyncio.run(replay(base.group(1), service.spec.model.served(), mooncake(limit=args.requests),
                               args.time_scale, 1.0, result, progress, service.spec.slo.ttft_ms / 1000))
        time.sleep(10)   # the last scrapes and rule evaluations
        for uid, name in SHOTS.items():
            url = f"{viewer.group(1)}?range=600#{uid}"
            rendered = panel_status(url)
            print(f"{uid}: {rendered.ok}/{rendered.panels} panels with data {rendered.failed or ''}")
            print(f"  {screenshot(url, args.out / name, height=1500)}")
    finally:
        up.stop(timeout=60)   # it stops its workers and Prometheus first
    return 0


if __name__ == "__main__":
    sys.exit(main())
