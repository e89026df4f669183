"""Free ports and child processes that are always cleaned up (local mode, tests, benchmarks).

Each child runs in its own session (process group) so that stopping it also stops anything
it spawned, and an `atexit` hook stops whatever a crashed test left behind. A SIGTERM to the
parent (`kill`, `timeout`) runs that hook too: by default Python dies on SIGTERM without running
atexit, and a benchmark's workers and router outlived it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

_LIVE: set[ManagedProcess] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; else its default)."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now and stays free until its process binds it: picked at random
    below the kernel's ephemeral range, so no outgoing connection is handed it in the meantime
    (a port from `bind(0)` comes from that range, and a vLLM instance that took a minute to start
    once found its NIXL port taken)."""
    low = _ephemeral_range()[0]
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(15000, max(15001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:   # a crowded range: let the kernel pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports (separate `free_port` calls may repeat one nothing has bound yet)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: ManagedProcess | None = None) -> None:
    """Poll `check` until it is true; fail with the process log if the process died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.returncode()} before {what}\n{proc.log_tail()}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    tail = proc.log_tail() if proc is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def tcp_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (one we did not start, so no handle to poll): a zombie
    nobody reaped yet still answers kill(0), and counts as gone."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return stat[stat.rindex(")") + 2] != "Z"   # the state, after "pid (comm) "; comm may hold spaces


def group_processes(pgid: int) -> Iterator[tuple[Path, list[str]]]:
    """(/proc/PID, the fields of its stat after "pid (comm) ") for every live process in process
    group `pgid`: a child and anything it spawned (ManagedProcess starts each in its own group).
    What the benchmarks measure a process tree's CPU time and memory by; a process gone since
    the listing is skipped."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue   # gone since the listing
        fields = stat[stat.rindex(")") + 2:].split()   # comm may hold spaces and parentheses
        if int(fields[2]) == pgid:                      # field 5 of stat: the process group
            yield entry, fields


class ManagedProcess:
    """A child process with its output in a log file and a guaranteed stop."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
        )
        _LIVE.add(self)
        _exit_on_sigterm()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def returncode(self) -> int | None:
        return self._proc.poll()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {self.name}| {line}" for line in lines[-n:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL it if it lingers."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(5)
        # A child that forked into the same group must not survive its parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._log.close()
        _LIVE.discard(self)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `atexit` stops the children; only where nobody set a
    handler of their own (a server's graceful shutdown keeps its own), and only from the main
    thread, the one place Python lets a handler be set."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        proc.stop(timeout=3)
