"""The peers benchmark's own accounting, on real processes: cold caches per run (the same replay
through the same router finds the same hits, not the previous run's blocks), hit rates from the
workers' counters, router CPU from its whole process group; and a peer router really serving a
stream in front of sim workers (skipped where the bench-only peers venv is not installed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from kvpilot.demo import worker_counters
from kvpilot.procs import ManagedProcess, tcp_open, wait_for
from kvpilot.sim.families import make_workload
from kvpilot.testing.peers import PeerRouter, group_cpu_seconds, peers_venv
from kvpilot.testing.sim import SimWorker

BENCH = Path(__file__).resolve().parents[2] / "bench" / "peers.py"
Workers = Callable[..., SimWorker]

BURN = """
import os, sys, time
def burn(seconds):
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass
child = os.fork()   # same process group: the router-and-children case
burn(0.3)
print("burnt", flush=True)
time.sleep(60)
"""


def test_router_cpu_counts_every_process_of_its_group(tmp_path: Path) -> None:
    proc = ManagedProcess("burn", [sys.executable, "-c", BURN], tmp_path / "burn.log")
    try:
        wait_for(lambda: proc.log_path.read_text().count("burnt") == 2, 60, "both processes to burn", proc)
        # Each process burnt 0.3 s of CPU: only the sum over the group reaches 0.6 s.
        assert group_cpu_seconds(proc.pid) >= 0.6
    finally:
        proc.stop()


def test_runs_start_cold_and_hit_rates_come_from_the_workers(tmp_path: Path) -> None:
    out = tmp_path / "peers"
    # kvpilot's router only (no peers venv needed): round-robin twice on one fleet, one seed.
    # A light rate (3 req/s modelled on 2 GPUs), so round-robin sees the requests in the same order twice.
    subprocess.run([sys.executable, "-P", str(BENCH), "--peers", "--kvpilot-policies", "round-robin", "round-robin",
                    "--workloads", "agentic", "--agentic-rates", "3", "--requests", "40",
                    "--repeats", "1", "--seed", "7", "--workers", "2", "--max-tokens", "4", "--out", str(out)],
                   check=True, timeout=300, cwd=tmp_path)
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert [r["contender"] for r in runs] == ["kvpilot:round-robin"] * 2
    assert all(r["completed"] == 40 and r["errors"] == 0 for r in runs), runs
    # Each run's counters cover that run alone: the engines looked up exactly the replay's prompt tokens.
    prompt_tokens = sum(s.prompt_tokens for s in make_workload("agentic", 40, 3.0, seed=7))
    assert all(r["cache_queries"] == prompt_tokens for r in runs), (prompt_tokens, runs)
    first, again = (r["hit_rate"] for r in runs)
    # Agentic tenants share long tool prompts: the replay has reuse, so a cold run hits too...
    assert first > 0.2, runs
    # ...but the rerun finds only its own reuse again: warm caches would have served every
    # tenant's prompt from its first request on.
    assert abs(again - first) < 0.1, runs
    assert all(r["router_cpu_s"] > 0 for r in runs), runs
    md = out.with_suffix(".md").read_text()
    assert "kvpilot:round-robin" in md and "agentic at 3 req/s" in md
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.skipif(peers_venv() is None, reason="no peers venv: `bash scripts/peers-env.sh` installs "
                    "sglang-router and vllm-router (bench-only, ~2 min, not part of scripts/test.sh)")
def test_a_peer_router_streams_in_front_of_sim_workers(sim_worker_factory: Workers, tmp_path: Path) -> None:
    workers = [sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5") for _ in range(2)]
    peer = PeerRouter("sglang", "round_robin", [w.url for w in workers], workdir=tmp_path)
    try:
        oa = openai.OpenAI(base_url=peer.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        for _ in range(2):   # round-robin: one request on each worker
            pieces = [c.choices[0].text for c in oa.completions.create(
                model="sim-model", prompt="hello " * 64, max_tokens=5, stream=True) if c.choices]
            assert len(pieces) == 5
        served = [worker_counters(w.url) for w in workers]
        assert all(got is not None and got[1] > 0 for got in served), served   # prompt tokens on each
    finally:
        peer.stop()
    deadline = time.monotonic() + 10
    while tcp_open("127.0.0.1", peer.port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tcp_open("127.0.0.1", peer.port)   # stopped with its whole process group
