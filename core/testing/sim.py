"""`kvpilot sim serve` workers as real processes on loopback, for integration tests."""

from __future__ import annotations

import sys
import tempfile
import urllib.request
from pathlib import Path

import openai

from kvpilot.procs import ManagedProcess, free_port, wait_for


class SimWorker:
    def __init__(self, *args: str, model: str = "sim-model", workdir: Path | None = None,
                 host: str = "127.0.0.1", port: int | None = None, wait: bool = True) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.model = model
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="kvpilot-sim-"))
        argv = [sys.executable, "-P", "-m", "kvpilot.cli", "sim", "serve", "--host", host, "--port", str(self.port),
                "--model", model, *args]
        self.proc = ManagedProcess(f"sim-{self.port}", argv, self.dir / f"sim-{self.port}.log")
        if wait:
            wait_for(self.healthy, 30, f"sim worker on port {self.port}", self.proc)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def healthy(self) -> bool:
        with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
            return bool(resp.status == 200)

    def openai_client(self) -> openai.OpenAI:
        """The official client pointed at this worker, with retries off so tests see every failure."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def stop(self) -> None:
        self.proc.stop()
