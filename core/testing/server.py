"""What the tests' server processes have in common: a process the test started, reached over
HTTP on loopback. `SimWorker`, `RouterProcess` and `VLLMServer` share one health check, one
metrics scrape, one OpenAI client and one stop, so a fix to any of them reaches all three."""

from __future__ import annotations

import urllib.request

import openai

from kvpilot.procs import ManagedProcess


class ServerProcess:
    """A server at `host`:`port` running as `proc`. A slower server raises the timeouts (class
    attributes, in seconds) rather than redefining the methods."""

    host: str = "127.0.0.1"
    port: int
    proc: ManagedProcess
    health_timeout_s: float = 1
    metrics_timeout_s: float = 5
    client_timeout_s: float = 30
    stop_timeout_s: float = 10

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def healthy(self) -> bool:
        with urllib.request.urlopen(self.url + "/health", timeout=self.health_timeout_s) as resp:
            return bool(resp.status == 200)

    def openai_client(self) -> openai.OpenAI:
        """The official client pointed at this server, with retries off so tests see every failure."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=self.client_timeout_s)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=self.metrics_timeout_s) as resp:
            return str(resp.read().decode())

    def stop(self) -> None:
        self.proc.stop(timeout=self.stop_timeout_s)
