"""`kvpilot sim serve` workers as real processes on loopback, for integration tests."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from kvpilot.procs import ManagedProcess, free_port, wait_for
from kvpilot.testing.server import ServerProcess


class SimWorker(ServerProcess):
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
