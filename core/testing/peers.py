"""Peer routers (`sglang-router`, `vllm-router` from PyPI) as real processes on loopback, in front
of workers a benchmark or test started, for comparing them with `kvpilot router` side by side.

The peers live in a bench-only venv (scripts/peers-env.sh, cached outside the clone and keyed by
their versions), never in kvpilot's own environment: they are Rust binaries in Python wheels that
only bench/peers.py and its skip-if-absent test need. Both bind their own Prometheus exporter
(default port 29000, which a second peer on the machine would already hold), so each gets a free
port of its own; readiness is their `/readiness` answer counting every worker healthy.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from kvpilot.procs import ManagedProcess, free_ports, group_processes, wait_for

ROOT = Path(__file__).resolve().parents[2]

# Every routing policy each peer's CLI offers for a plain (not P/D) fleet. Left out, with why:
# sglang `manual` and vllm `sticky_least_loaded` pin by a client-chosen routing-key header the
# replays have no counterpart of (without it they are random / least-loaded, measured already);
# vllm `kv_aware` needs vLLM's ZMQ KV-event stream, which the simulator does not publish.
PEER_POLICIES: dict[str, tuple[str, ...]] = {
    "sglang": ("cache_aware", "power_of_two", "round_robin", "random"),
    "vllm": ("cache_aware", "power_of_two", "consistent_hash", "round_robin", "random"),
}


def peers_venv() -> Path | None:
    """The bench venv: $KVPILOT_PEERS_VENV, else the path scripts/peers-env.sh caches it at if that
    install completed; None when neither exists (callers skip or tell the user to run the script)."""
    env = os.environ.get("KVPILOT_PEERS_VENV")
    if env:
        return Path(env) if (Path(env) / "bin" / "python").exists() else None
    script = ROOT / "scripts" / "peers-env.sh"
    if not script.exists():
        return None
    cache = Path(os.environ.get("KVPILOT_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                / "kvpilot"))
    versions = {k: v for k, _, v in (line.partition("=") for line in script.read_text().splitlines())
                if k in ("SGLANG_ROUTER_VERSION", "VLLM_ROUTER_VERSION")}
    key = f"sglang-router-{versions['SGLANG_ROUTER_VERSION']}_vllm-router-{versions['VLLM_ROUTER_VERSION']}"
    venv = cache / "peers" / key / "venv"
    return venv if (venv / ".kvpilot-complete").exists() else None


def install_peers_venv() -> Path:
    """Run scripts/peers-env.sh (a no-op when cached; a couple of minutes cold) and return the venv."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "peers-env.sh")], check=True, capture_output=True,
                         text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def peer_argv(kind: str, policy: str, venv: Path, port: int, metrics_port: int,
              worker_urls: Sequence[str]) -> list[str]:
    """The command line of one peer on loopback: retries off (kvpilot's benchmark router runs with
    none either, and a retried request would be counted twice by the engines' hit counters)."""
    if policy not in PEER_POLICIES.get(kind, ()):
        raise ValueError(f"{kind} router has no policy {policy!r} here; known: {PEER_POLICIES.get(kind)}")
    common = ["--host", "127.0.0.1", "--port", str(port), "--policy", policy,
              "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
              "--worker-urls", *worker_urls, "--disable-retries", "--log-level", "warn" if kind == "sglang"
              else "warning"]
    py = str(venv / "bin" / "python")
    if kind == "sglang":
        return [py, "-m", "sglang_router.launch_router", *common]
    if kind == "vllm":
        return [py, "-m", "vllm_router.launch_router", *common]
    raise ValueError(f"unknown peer router {kind!r}; known: {', '.join(PEER_POLICIES)}")


class PeerRouter:
    """One peer router process: started, waited on until it reports every worker healthy, and
    stopped with its whole process group (ManagedProcess)."""

    def __init__(self, kind: str, policy: str, worker_urls: Sequence[str], venv: Path | None = None,
                 workdir: Path | None = None, timeout_s: float = 60.0) -> None:
        venv = venv or peers_venv()
        if venv is None:
            raise FileNotFoundError("no peers venv: run scripts/peers-env.sh (or set KVPILOT_PEERS_VENV)")
        self.kind, self.policy, self.workers = kind, policy, len(worker_urls)
        self.port, metrics_port = free_ports(2)
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="kvpilot-peer-"))
        argv = peer_argv(kind, policy, venv, self.port, metrics_port, worker_urls)
        # Not from the repo root: its ./operator folder would shadow the standard library module.
        self.proc = ManagedProcess(f"{kind}-router-{self.port}", argv, self.dir / f"{kind}-{self.port}.log",
                                   cwd=self.dir)
        try:
            wait_for(self.ready, timeout_s, f"{kind}-router ({policy}) on port {self.port}", self.proc)
        except BaseException:
            self.proc.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> bool:
        with urllib.request.urlopen(self.url + "/readiness", timeout=1) as resp:
            body = json.loads(resp.read().decode())
        return resp.status == 200 and int(body.get("healthy_workers", 0)) >= self.workers

    def stop(self) -> None:
        self.proc.stop()


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group `pgid` (a router and
    anything it spawned), from /proc: what a router costs, whatever language it is written in."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for _, fields in group_processes(pgid):
        total += (int(fields[11]) + int(fields[12])) / tick   # utime, stime
    return total
