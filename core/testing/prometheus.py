"""Debian's `prometheus` on a free loopback port, scraping targets the caller names."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kvpilot.procs import ManagedProcess, free_port, wait_for


class PrometheusServer:
    """Scrapes `targets` (host:port strings) every `scrape_interval`, all in one job."""

    def __init__(self, targets: list[str], job: str = "kvpilot", scrape_interval: str = "1s",
                 workdir: Path | None = None) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: install Debian's prometheus (make test does)")
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="kvpilot-prom-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        cfg_path = self.dir / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(config))
        self.proc = ManagedProcess(
            "prometheus",
            [binary, f"--config.file={cfg_path}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            self.dir / "prometheus.log",
        )
        wait_for(lambda: self._get("/-/ready") is not None, 30, "prometheus to become ready", self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str) -> bytes | None:
        with urllib.request.urlopen(self.url + path, timeout=2) as resp:
            return resp.read() if resp.status == 200 else None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query over the HTTP API; returns `data.result`."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        payload = json.loads(body or b"{}")
        if payload.get("status") != "success":
            raise RuntimeError(f"PromQL {promql!r} failed: {payload}")
        result: list[dict[str, Any]] = payload["data"]["result"]
        return result

    def stop(self) -> None:
        self.proc.stop()
