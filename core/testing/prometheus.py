"""Debian's `prometheus` on a free loopback port, scraping targets the caller names."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kvpilot.procs import ManagedProcess, free_port, wait_for


class PrometheusServer:
    """Scrapes `targets` (host:port strings) every `scrape_interval`, all in one job; or, with
    `scrape_configs`, whatever those say (file_sd_configs paths may be relative to `dir`).
    `rules`: a rules document ({"groups": [...]}) Prometheus evaluates every interval."""

    def __init__(self, targets: list[str], job: str = "kvpilot", scrape_interval: str = "1s",
                 workdir: Path | None = None, scrape_configs: list[dict[str, Any]] | None = None,
                 rules: dict[str, Any] | None = None) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: install Debian's prometheus (make test does)")
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="kvpilot-prom-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config: dict[str, Any] = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": scrape_configs or [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        if rules is not None:
            (self.dir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
            config["rule_files"] = [str(self.dir / "rules.yaml")]
        cfg_path = self.dir / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(config))
        self.proc = ManagedProcess(
            "prometheus",
            [binary, f"--config.file={cfg_path}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            self.dir / "prometheus.log",
        )
        wait_for(lambda: self._get("/-/ready") is not None, 30, "prometheus to become ready", self.proc)

    def write_targets(self, name: str, groups: list[dict[str, Any]]) -> None:
        """Replace a file_sd target file (`dir/name`): [{"targets": [...], "labels": {...}}, ...].
        Prometheus notices the rename and scrapes the new set on its next interval."""
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.dir / name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str) -> bytes | None:
        with urllib.request.urlopen(self.url + path, timeout=2) as resp:
            return resp.read() if resp.status == 200 else None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query over the HTTP API; returns `data.result`."""
        payload = self.api("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if payload.get("status") != "success":
            raise RuntimeError(f"PromQL {promql!r} failed: {payload}")
        result: list[dict[str, Any]] = payload["data"]["result"]
        return result

    def api(self, path: str) -> dict[str, Any]:
        """GET an HTTP API path; the JSON answer, errors (4xx with a JSON body) included."""
        try:
            body = self._get(path)
        except urllib.error.HTTPError as err:
            body = err.read()
        payload: dict[str, Any] = json.loads(body or b"{}")
        return payload

    def metric_names(self) -> set[str]:
        """Every `__name__` Prometheus holds: scraped and recorded series."""
        return set(self.api("/api/v1/label/__name__/values").get("data", []))

    def stop(self) -> None:
        self.proc.stop()
