"""A local Ray for tests and benchmarks: bounded CPUs, loopback, a private temp dir, nothing left behind.

`ray.init` gives the raylet a hard-coded 30 s to register with the GCS; on a saturated 2-core
machine that can pass, and the half-started processes outlive the failed call. `LocalRay` kills
everything started under its temp dir and tries again with a fresh one. The driver runs from
the temp dir: Ray puts the driver's directory on workers' `sys.path`, and the repo root holds a
folder named `operator`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import ray
from ray import serve

RAYLET_TIMEOUT = "timed out during startup"


def processes_mentioning(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains `marker`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state != "Z":
            out.append(int(entry.name))
    return out


class LocalRay:
    def __init__(self, num_cpus: int = 2, attempts: int = 3, grace_s: float = 30.0) -> None:
        self.num_cpus, self.attempts, self.grace_s = num_cpus, attempts, grace_s
        self.temp = ""
        self._cwd = os.getcwd()

    def start(self, http_port: int | None = None) -> None:
        """Ray (and Serve's HTTP proxy on 127.0.0.1:`http_port`, when given)."""
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        for attempt in range(self.attempts):
            # Short: Ray's unix socket paths under it must fit in 107 bytes.
            self.temp = tempfile.mkdtemp(prefix="kvr", dir="/tmp")
            os.chdir(self.temp)
            try:
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False,
                         _node_ip_address="127.0.0.1", _temp_dir=self.temp, log_to_driver=False,
                         configure_logging=False)
                break
            except Exception as e:
                self._clean()
                if RAYLET_TIMEOUT not in str(e) or attempt == self.attempts - 1:
                    raise
        if http_port is not None:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})

    def stop(self) -> list[int]:
        """Serve and Ray down; the pids of this Ray's processes still alive after `grace_s`, killed."""
        try:
            if ray.is_initialized():
                serve.shutdown()  # type: ignore[no-untyped-call]  # without Serve running it only logs
        finally:
            ray.shutdown()
        return self._clean()

    def _clean(self) -> list[int]:
        os.chdir(self._cwd)
        if not self.temp:
            return []
        deadline = time.monotonic() + self.grace_s
        while processes_mentioning(self.temp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = processes_mentioning(self.temp)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp = ""
        return left
