"""kvpilot's DualMap as Ray Serve's request router, on a local Ray cluster (2 CPUs, loopback).

The simulator app (`kvpilot.ray.app`) runs twice side by side, same replicas and engines: once with
kvpilot's router on the engine deployment, once with Serve's default (power of two choices). The
official `openai` client streams completions through Serve's HTTP proxy; where each request ran,
and what that replica's prefix cache did, come from the replicas' own counters in each response.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import ray
from ray import serve

from kvpilot.procs import free_port
from kvpilot.ray.app import build_app

pytestmark = pytest.mark.timeout(600)   # Ray and 8 replica processes start in ~45 s on a quiet 2-core box, 3 min loaded
REPLICAS = 3
PREFIXES = [f"tenant {p} system prompt. " + "You answer questions about cache-aware routing. " * 24
            for p in range(10)]   # 10 prefixes: all on one of 3 replicas by chance has p = 5e-5
ROUNDS = 3


def _session_processes(session: str) -> list[int]:
    """Pids of live processes whose command line names this Ray session (raylet, GCS, workers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if session.encode() in cmdline and state != "Z":
            out.append(int(entry.name))
    return out


@pytest.fixture(scope="module")
def serve_port() -> Iterator[int]:
    temp = tempfile.mkdtemp(prefix="kvr", dir="/tmp")   # short: Ray's unix socket paths must fit 107 bytes
    cwd = os.getcwd()
    os.chdir(temp)   # Ray puts the driver's directory on workers' sys.path; the repo root holds `operator/`
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=temp, log_to_driver=False, configure_logging=False)
    session = os.path.basename(os.path.realpath(os.path.join(temp, "session_latest")))
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([   # both apps start together (replica start-up dominates this test's time)
            serve.RunTarget(build_app(replicas=REPLICAS, router="dualmap"), name="kvpilot", route_prefix="/kvpilot"),
            serve.RunTarget(build_app(replicas=REPLICAS, router=None), name="default", route_prefix="/default")])
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.chdir(cwd)
            deadline = time.monotonic() + 30
            while _session_processes(session) and time.monotonic() < deadline:
                time.sleep(0.5)
            left = _session_processes(session)
            for pid in left:   # never leave a raylet or GCS behind, even when the assertion fails
                os.kill(pid, 9)
            shutil.rmtree(temp, ignore_errors=True)
            assert not left, f"Ray processes survived ray.shutdown(): {left}"


def _replay(port: int, app: str) -> tuple[dict[int, set[str]], float]:
    """Each prefix's requests in turn (one at a time): which replicas served each prefix, and the
    prefix-cache hit rate the replicas themselves counted."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/{app}/v1", api_key="none", max_retries=0, timeout=60)
    served: dict[int, set[str]] = {}
    counters: dict[str, dict[str, int]] = {}
    for r in range(ROUNDS):
        for p, prefix in enumerate(PREFIXES):
            text, last = "", None
            for chunk in client.completions.create(model="sim-model", prompt=prefix + f"Question {r}: why?",
                                                   max_tokens=4, stream=True):
                text += "".join(c.text for c in chunk.choices)
                last = chunk
            assert last is not None and text.strip(), "an empty stream"
            mine = (last.model_extra or {})["kvpilot"]
            served.setdefault(p, set()).add(mine["replica"])
            counters[mine["replica"]] = mine    # counters only grow: the latest is the replica's total
    hits = sum(c["prefix_cache_hits"] for c in counters.values())
    queries = sum(c["prefix_cache_queries"] for c in counters.values())
    return served, hits / queries


def test_prefix_sharing_requests_stay_on_one_replica_with_kvpilot_and_spread_without(serve_port: int) -> None:
    ours, our_hit_rate = _replay(serve_port, "kvpilot")
    assert all(len(replicas) == 1 for replicas in ours.values()), ours
    assert len(set().union(*ours.values())) > 1, "every prefix on one replica: nothing was balanced"
    theirs, their_hit_rate = _replay(serve_port, "default")
    assert any(len(replicas) > 1 for replicas in theirs.values()), theirs
    assert our_hit_rate > their_hit_rate, (our_hit_rate, their_hit_rate)
