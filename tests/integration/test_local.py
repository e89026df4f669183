"""Local mode: `kvpilot up` runs the control plane as processes and leaves nothing behind;
`kvpilot demo` replays a trace through it and prints its report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import redis

from kvpilot.local import LocalControlPlane, load_service
from kvpilot.procs import tcp_open, wait_for
from kvpilot.testing.load import uncacheable_completion

KVPILOT = [sys.executable, "-P", "-m", "kvpilot.cli"]


def descendants(pid: int) -> set[int]:
    """All live processes below `pid`, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_serves_and_sigint_leaves_no_process(tmp_path: Path) -> None:
    spec = tmp_path / "svc.yaml"
    spec.write_text("""
apiVersion: kvpilot.io/v1alpha1
kind: LLMService
metadata: {name: t}
spec:
  model: {name: tiny, servedName: tiny}
  engine: {type: simulator, profile: h100-qwen2.5-0.5b}
  mode: aggregated
  decode: {replicas: 2}
  routing: {policy: dualmap}
""")
    proc = subprocess.Popen([*KVPILOT, "up", "-f", str(spec), "--time-scale", "5"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"base URL (http://127\.0\.0\.1:(\d+))/v1", line)
        assert match, line
        url, port = match.group(1), int(match.group(2))
        reply = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
            model="tiny", prompt="hello", max_tokens=3)
        assert len(reply.choices[0].text.split()) == 3
        children = descendants(proc.pid)
        assert len(children) >= 3  # two workers and the router
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in children):
        time.sleep(0.1)
    assert not [p for p in children if alive(p)]
    wait_for(lambda: not tcp_open("127.0.0.1", port), 5, "the router port to close")


def test_demo_runs_to_completion_and_reports(tmp_path: Path) -> None:
    out = subprocess.run([*KVPILOT, "demo", "--requests", "40", "--time-scale", "10", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 0, out.stdout + out.stderr
    for policy in ("dualmap", "round-robin"):
        # The table's row: the policy, then ok/errors (the progress bar and autoscaler lines also
        # start with the policy's name).
        rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == [policy]]
        row = next(r for r in rows if len(r) > 1 and r[1].replace("/", "").isdigit())
        assert row[1] == "40/0"  # every request answered, none failed
    assert "SLO" in out.stdout and "hit" in out.stdout and "GPUs" in out.stdout and "ideal" in out.stdout
    png = tmp_path / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_local_autoscaler_grows_and_shrinks_the_pool_and_the_router_follows(tmp_path: Path) -> None:
    spec = tmp_path / "svc.yaml"
    spec.write_text("""
apiVersion: kvpilot.io/v1alpha1
kind: LLMService
metadata: {name: auto}
spec:
  model: {name: llama, servedName: llama}
  engine: {type: simulator, profile: h100-llama3-8b}
  mode: aggregated
  decode: {replicas: 1, minReplicas: 1, maxReplicas: 3}
  routing: {policy: least-loaded}
  slo: {ttftMs: 300, tpotMs: 100}
  autoscaling: {enabled: true, scaleDownStabilizationSeconds: 4}
""")
    stop = threading.Event()

    def load(url: str) -> None:
        while not stop.is_set():
            uncacheable_completion(url, "llama", max_tokens=4)

    def data(url: str) -> dict[str, object]:
        with urllib.request.urlopen(url + "/dashboard/data", timeout=5) as resp:
            model: dict[str, object] = json.loads(resp.read())["models"][0]
            return model

    with LocalControlPlane(load_service(spec), workdir=tmp_path / "plane", interval_s=1.0) as plane:
        clients = [threading.Thread(target=load, args=(plane.url,), daemon=True) for _ in range(6)]
        for c in clients:
            c.start()
        try:
            wait_for(lambda: len(data(plane.admin_url)["endpoints"]) >= 2, 60, "the router to see a second worker")  # type: ignore[arg-type]
            assert any(e.after > e.before for e in plane.events)
            assert data(plane.admin_url)["scaling"], "the dashboard lists the autoscaler's decisions"
        finally:
            stop.set()
            for c in clients:
                c.join(timeout=40)
        wait_for(lambda: len(plane.workers) == 1, 60, "the pool to shrink back")
        wait_for(lambda: len(data(plane.admin_url)["endpoints"]) == 1, 10, "the router to drop retired workers")  # type: ignore[arg-type]
        assert any(e.after < e.before for e in plane.events)


def test_local_pd_hands_kv_over_through_a_private_redis(tmp_path: Path) -> None:
    spec = tmp_path / "svc.yaml"
    spec.write_text("""
apiVersion: kvpilot.io/v1alpha1
kind: LLMService
metadata: {name: pd}
spec:
  model: {name: tiny, servedName: tiny}
  engine: {type: simulator, profile: h100-qwen2.5-0.5b}
  mode: disaggregated
  prefill: {replicas: 1}
  decode: {replicas: 1}
""")
    with LocalControlPlane(load_service(spec), workdir=tmp_path / "plane", time_scale=5) as plane:
        assert plane.kv_store is not None and plane.kv_store.startswith("redis://127.0.0.1:")
        body = json.dumps({"model": "tiny", "prompt": "word " * 400, "max_tokens": 8}).encode()
        req = urllib.request.Request(plane.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["choices"][0]["text"]
        decode = next(url for name, url in plane.workers.items() if "-decode-" in name)
        with urllib.request.urlopen(decode + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        moved = [line for line in metrics.splitlines() if line.startswith("vllm:nixl_bytes_transferred")]
        assert moved and float(moved[0].rsplit(" ", 1)[1]) > 0, metrics[-1500:]
        stats = redis.Redis.from_url(plane.kv_store).info("stats")
        assert stats["keyspace_hits"] > 0  # the decode worker read the prefill's KV blocks from this Redis
