"""Two autoscalers with --leader-elect on the real API: only the Lease's holder decides (and so
only it can write scale or status); killed without a goodbye, its lease lapses and the standby takes over, no earlier
than the lease allows."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvpilot.procs import ManagedProcess, free_port, wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane
from kvpilot.testing.load import another_decision, autoscaler_decisions

Get = Callable[..., Any]
LEASE_S = 3
SERVICE = {
    "apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": "led"},
    "spec": {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
        "engine": {"type": "simulator", "profile": "h100-llama3-8b"},
        "mode": "aggregated",
        "decode": {"replicas": 0, "minReplicas": 0, "maxReplicas": 3, "gpus": 1},
        "autoscaling": {"enabled": True},
    },
}


def _time(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_one_of_two_autoscalers_acts_and_the_other_takes_over_when_it_dies(
        crds: ControlPlane, operator: Any, namespace: str, kget: Get, tmp_path: Path) -> None:
    out = crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(SERVICE))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: (kget("workerpool", "led-worker") or {}).get("status", {}).get("selector"), 60,
             "the WorkerPool and its selector")
    ports = {"a": free_port(), "b": free_port()}
    scalers = {who: ManagedProcess(f"autoscaler-{who}", [
        sys.executable, "-P", "-m", "kvpilot.cli", "autoscaler", "run", "-n", namespace, "--interval", "1",
        "--leader-elect", "--lease-namespace", namespace, "--lease-duration", str(LEASE_S), "--identity", who,
        "--metrics-port", str(port), "--log-format", "text"], tmp_path / f"autoscaler-{who}.log", env=crds.env(),
        cwd=REPO_ROOT) for who, port in ports.items()}
    try:
        wait_for(lambda: kget("lease", "kvpilot-autoscaler") is not None, 60, "the Lease")
        leader = kget("lease", "kvpilot-autoscaler")["spec"]["holderIdentity"]
        standby = "b" if leader == "a" else "a"
        # The leader acts (decides every interval and writes the status); the standby does not.
        wait_for(lambda: autoscaler_decisions(ports[leader]) > 0, 30, "the leader's first decision")
        wait_for(lambda: kget("llmservice", "led").get("status", {}).get("autoscaling"), 30, "status.autoscaling")
        for _ in range(3):   # a few intervals in which the standby, alive and polling, does nothing
            another_decision(ports[leader])
            assert autoscaler_decisions(ports[standby]) == 0
            assert kget("lease", "kvpilot-autoscaler")["spec"]["holderIdentity"] == leader
        before = kget("lease", "kvpilot-autoscaler")["spec"]

        os.killpg(scalers[leader].pid, signal.SIGKILL)      # no shutdown: the lease must lapse
        wait_for(lambda: kget("lease", "kvpilot-autoscaler")["spec"]["holderIdentity"] == standby, 30,
                 f"the standby to take over\n{scalers[standby].log_tail()}")
        after = kget("lease", "kvpilot-autoscaler")["spec"]
        # Not before the lease lapsed (the old holder may have renewed once more after `before`).
        assert _time(after["acquireTime"]) - _time(before["renewTime"]) > dt.timedelta(seconds=LEASE_S)
        assert after["leaseTransitions"] == before.get("leaseTransitions", 0) + 1
        wait_for(lambda: autoscaler_decisions(ports[standby]) > 0, 30, "the new leader's decisions")
        assert "acquired the lease" in scalers[standby].log_path.read_text()
    finally:
        for proc in scalers.values():
            proc.stop()
