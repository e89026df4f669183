"""Operator reconcile latency and memory at scale, on the real control plane with kwok nodes.

    .venv/bin/python -P bench/operator_scale.py [--nodes 1000] [--services 100] [--rate 1]

Starts the full harness (etcd, kube-apiserver, controller-manager, scheduler, kwok) with `--nodes`
fake nodes of 8 × nvidia.com/gpu, applies the CRDs, runs `kvpilot operator run --standalone` as a
process, then creates `--services` aggregated simulator LLMServices back to back (a burst: what
`kubectl apply -f dir/` does) or, with `--rate R`, R per second (a steady stream: what a platform
team's GitOps sync does over a day; the operator's own latency, not its backlog). For each it
records the time from its create call until both of its Deployments (the worker pool and the
router) exist, as seen by a `kubectl get --watch` running alongside the creates. Reports p50/p99
of that latency, the total,
the operator's resident memory (VmRSS now, VmHWM peak) once everything has reconciled, and how
many apiserver requests the operator's reconcile code made per LLMService (from its own
`kvpilot_operator_api_requests_total` metric; kopf's own watches and annotation patches not counted).
Results: bench/results/operator_scale.md.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from kubernetes import client, config

from kvpilot.procs import ManagedProcess, free_port, wait_for
from kvpilot.sim.cluster import percentile
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane


def service(name: str) -> dict[str, object]:
    return {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": {"name": name},
            "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "servedName": name},
                     "engine": {"type": "simulator", "profile": "h100-qwen2.5-0.5b"}, "mode": "aggregated",
                     "decode": {"replicas": 1, "gpus": 1}}}


def rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def api_requests(port: int) -> Counter[str]:
    """The operator's apiserver requests so far, by method and resource, from its metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts: Counter[str] = Counter()
    pattern = r'^kvpilot_operator_api_requests_total\{method="(\w+)",resource="([^"]+)"\} (\S+)$'
    for m in re.finditer(pattern, text, re.M):
        counts[f"{m[1]} {m[2]}"] += int(float(m[3]))
    return counts


class DeploymentWatch:
    """When each Deployment in `default` first appeared, from `kubectl get --watch` read in a thread:
    event-driven, so the measurement neither polls the apiserver nor waits for the create loop."""

    def __init__(self, plane: ControlPlane) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._proc = subprocess.Popen([str(plane.bin / "kubectl"), "get", "deployments", "-n", "default", "--watch",
                                       "-o", "name"], env=plane.env(), stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(1)  # the watch is open before the first create

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            name = line.strip().rsplit("/", 1)[-1]
            with self._lock:
                self._seen.setdefault(name, time.monotonic())

    def at(self, name: str) -> float | None:
        with self._lock:
            return self._seen.get(name)

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0.0, help="LLMServices created per second (0: a burst)")
    args = parser.parse_args()
    with ControlPlane("full") as plane:
        t0 = time.monotonic()
        for start in range(0, args.nodes, 250):  # in batches: one kubectl call per 250 nodes
            plane.add_gpu_nodes(min(250, args.nodes - start), gpus=8, prefix=f"n{start}")
        print(f"{args.nodes} kwok GPU nodes Ready in {time.monotonic() - t0:.1f}s", flush=True)
        assert plane.kubectl("apply", "-f", str(REPO_ROOT / "deploy" / "crds")).returncode == 0
        plane.kubectl("wait", "--for=condition=Established", "--timeout=30s", "crd/llmservices.kvpilot.io")
        port = free_port()
        op = ManagedProcess("operator", [sys.executable, "-P", "-m", "kvpilot.cli", "operator", "run", "--standalone",
                                         "--metrics-port", str(port)],
                            plane.dir / "logs" / "operator.log", env=plane.env(), cwd=REPO_ROOT)
        wait_for(lambda: "Initial authentication has finished" in op.log_path.read_text(), 60, "the operator", op)
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        custom = client.CustomObjectsApi(api)
        seen = DeploymentWatch(plane)
        created: dict[str, float] = {}
        names = [f"svc-{i:03d}" for i in range(args.services)]
        t_start = time.monotonic()
        for i, name in enumerate(names):
            if args.rate > 0:
                time.sleep(max(0.0, t_start + i / args.rate - time.monotonic()))
            created[name] = time.monotonic()
            custom.create_namespaced_custom_object("kvpilot.io", "v1alpha1", "default", "llmservices", service(name))
        burst = time.monotonic() - t_start
        deadline = time.monotonic() + 600
        done: dict[str, float] = {}
        while len(done) < len(names) and time.monotonic() < deadline:
            for name in names:
                worker, router = seen.at(f"{name}-worker"), seen.at(f"{name}-router")
                if name not in done and worker is not None and router is not None:
                    done[name] = max(worker, router)
            time.sleep(0.2)
        seen.stop()
        latencies = [done[n] - created[n] for n in done]
        time.sleep(10)  # let the tail of the burst (status updates as pods start) settle before counting
        rss, hwm = rss_kib(op.pid)
        calls = api_requests(port)
        print(f"| nodes | LLMServices | reconciled | apply→children p50 s | p99 s | all done s | operator RSS MiB "
              f"| peak MiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n| {args.nodes} | {args.services} | "
              f"{len(done)} | {percentile(latencies, 50):.2f} | {percentile(latencies, 99):.2f} | "
              f"{max(done.values(), default=t_start) - t_start:.1f} | {rss / 1024:.0f} | {hwm / 1024:.0f} |",
              flush=True)
        print(f"(the {args.services} creates took {burst:.1f}s: "
              f"{'a burst' if args.rate <= 0 else f'{args.rate:g} per second'})", flush=True)
        total = sum(calls.values())
        print(f"operator API requests: {total} ({total / max(1, len(done)):.1f} per LLMService); by kind: "
              + ", ".join(f"{k} {v}" for k, v in calls.most_common()), flush=True)
        op.stop()


if __name__ == "__main__":
    main()
