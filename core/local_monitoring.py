"""`kvpilot up --prometheus`: Debian's Prometheus scraping every local process with kvpilot's rules,
and a small console serving the autoscaler's metrics and a viewer of the Grafana dashboards.

Targets carry the labels the chart's PodMonitors give pods on a cluster (`namespace`,
`kvpilot_io_service`, `kvpilot_io_role`, `pod`, ...), and the autoscaler's own `namespace`/`service`
labels are honoured as its ServiceMonitor does, so the dashboards' and rules' PromQL answers the
same on a laptop. The viewer (core/dashboards/viewer.html) draws each panel of
deploy/dashboards/*.json from its PromQL through this console's proxy to Prometheus' query API.
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from kvpilot.dashboards.queries import DASHBOARDS
from kvpilot.dashboards.rules import rule_groups
from kvpilot.procs import free_port
from kvpilot.testing.prometheus import PrometheusServer

NAMESPACE = "local"   # what local mode calls its namespace, in the autoscaler's labels and the targets'
VIEWER = Path(__file__).parent / "dashboards" / "viewer.html"


class LocalMonitoring:
    """Prometheus and the console for one local control plane; `targets` follows the pool."""

    def __init__(self, service: str, registry: CollectorRegistry, workdir: Path, scrape_interval: str = "5s") -> None:
        self.service = service
        self.registry = registry
        self.console_port = free_port()
        self.console = ThreadingHTTPServer(("127.0.0.1", self.console_port), _handler(self))
        self._thread = threading.Thread(target=self.console.serve_forever, name="local-console", daemon=True)
        self._thread.start()
        self.prometheus: PrometheusServer | None = None
        try:
            self.prometheus = PrometheusServer([], workdir=workdir, scrape_interval=scrape_interval,
                                               rules=rule_groups(), scrape_configs=self._scrape_configs(workdir))
        except BaseException:
            self.stop()
            raise

    def _scrape_configs(self, workdir: Path) -> list[dict[str, Any]]:
        return [
            {"job_name": "kvpilot-engines", "file_sd_configs": [{"files": [str(workdir / "engines.json")]}]},
            {"job_name": "kvpilot-router", "file_sd_configs": [{"files": [str(workdir / "router.json")]}]},
            # The autoscaler names each LLMService in its own namespace/service labels.
            {"job_name": "kvpilot-autoscaler", "honor_labels": True, "static_configs": [{
                "targets": [f"127.0.0.1:{self.console_port}"],
                "labels": {"app_kubernetes_io_component": "autoscaler", "pod": "autoscaler"}}]},
        ]

    @property
    def url(self) -> str:
        assert self.prometheus is not None
        return self.prometheus.url

    @property
    def viewer_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}/"

    def _labels(self, component: str, pod: str, **extra: str) -> dict[str, str]:
        return {"namespace": NAMESPACE, "kvpilot_io_service": self.service, "app_kubernetes_io_component": component,
                "pod": pod, **extra}

    def engines(self, workers: Iterable[tuple[str, str, str, str]]) -> None:
        """(name, role, pool name, URL) of each serving worker."""
        if self.prometheus is None:
            return
        groups = [{"targets": [url.removeprefix("http://")],
                   "labels": self._labels("engine", name, kvpilot_io_role=role, kvpilot_io_workerpool=pool)}
                  for name, role, pool, url in workers]
        self.prometheus.write_targets("engines.json", groups)

    def router(self, url: str) -> None:
        if self.prometheus is not None:
            self.prometheus.write_targets("router.json", [{"targets": [url.removeprefix("http://")],
                                                            "labels": self._labels("router", "router")}])

    def stop(self) -> None:
        self.console.shutdown()
        self.console.server_close()
        if self.prometheus is not None:
            self.prometheus.stop()


def dashboards() -> list[dict[str, Any]]:
    """The generated dashboards this checkout holds (none in an installed wheel)."""
    return [json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))]


def _handler(mon: LocalMonitoring) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that gave up
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path == "/metrics":
                self._send(200, generate_latest(mon.registry), "text/plain; version=0.0.4")
            elif path in ("/", "/index.html"):
                self._send(200, VIEWER.read_bytes(), "text/html; charset=utf-8")
            elif path == "/dashboards.json":
                self._send(200, json.dumps(dashboards()).encode(), "application/json")
            elif path.startswith("/api/v1/") and mon.prometheus is not None:
                try:
                    with urllib.request.urlopen(mon.prometheus.url + self.path, timeout=30) as resp:
                        self._send(resp.status, resp.read(), "application/json")
                except urllib.error.HTTPError as err:
                    self._send(err.code, err.read(), "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

    return Handler
