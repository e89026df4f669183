"""Local mode: `kvpilot up` runs the control plane as processes and leaves nothing behind;
`kvpilot demo` replays a trace through it and prints its report."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai

from kvpilot.procs import tcp_open, wait_for

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


def test_demo_runs_to_completion_and_reports() -> None:
    out = subprocess.run([*KVPILOT, "demo", "--requests", "40", "--time-scale", "10"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 0, out.stdout + out.stderr
    for policy in ("dualmap", "round-robin"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(f"│ {policy}"))
        assert "40 / 0" in row  # every request answered, none failed
    assert "SLO attainment" in out.stdout and "hit rate" in out.stdout
