"""Debian's `redis-server` on a free loopback port, with no persistence."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kvpilot.procs import ManagedProcess, free_port, tcp_open, wait_for


class RedisServer:
    def __init__(self, workdir: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install Debian's redis-server (make test does)")
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="kvpilot-redis-"))
        self.host = "127.0.0.1"
        self.port = free_port()
        self.proc = ManagedProcess(
            "redis",
            [binary, "--bind", self.host, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "yes"],
            self.dir / "redis.log",
        )
        wait_for(lambda: tcp_open(self.host, self.port), 15, "redis to accept connections", self.proc)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        self.proc.stop()
