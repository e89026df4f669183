"""Several router replicas in front of the same workers, as real processes on loopback: they agree
on placement with no shared state, a killed replica fails its clients' streams explicitly, and
`--workers` runs several router processes on one port."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.demo import worker_counters
from kvpilot.procs import free_ports, wait_for
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text

Workers = Callable[..., SimWorker]
Routers = Callable[..., RouterProcess]
FAST = ("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5")
# A modelled 8B at wall speed: a long stream is still streaming when its router is killed a moment
# after its first tokens.
SLOW = ("--profile", "h100-llama3-8b")
LONG = 4000   # tokens: a minute of streaming, far more than the test's wait before the kill


def model(workers: list[SimWorker], policy: str = "dualmap") -> list[dict[str, object]]:
    return [{"name": "sim-model", "policy": policy,
             "endpoints": [{"name": f"w{w.port}", "url": w.url} for w in workers]}]


def served_by(router: RouterProcess, prompt: str) -> str:
    req = urllib.request.Request(router.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "sim-model", "prompt": prompt, "max_tokens": 2}).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return str(resp.headers["X-Kvpilot-Endpoint"])


def test_two_replicas_send_a_shared_prefix_to_the_same_worker(sim_worker_factory: Workers,
                                                              router_factory: Routers) -> None:
    workers = [sim_worker_factory(*FAST) for _ in range(3)]
    replicas = [router_factory(model(workers)) for _ in range(2)]
    before = [worker_counters(w.url) for w in workers]
    homes: dict[int, set[str]] = {}
    for prefix in range(6):
        head = block_text(500 + prefix, 1024)
        for turn in range(4):   # alternately through each replica: neither sees the whole session
            homes.setdefault(prefix, set()).add(served_by(replicas[turn % 2], head + block_text(9000 + turn, 64)))
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len(set().union(*homes.values())) >= 2, homes   # and different prefixes do spread
    # Engine side: every turn after a prefix's first found the prefix cached (≥ 3/4 × 1024/1088).
    after = [worker_counters(w.url) for w in workers]
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True) if a and b)
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True) if a and b)
    assert hits / queries > 0.6, (hits, queries)


def test_a_killed_replica_fails_its_streams_and_a_retry_through_the_other_completes(
        sim_worker_factory: Workers, router_factory: Routers) -> None:
    workers = [sim_worker_factory(*SLOW) for _ in range(2)]
    doomed, other = (router_factory(model(workers)) for _ in range(2))
    prompts = [block_text(700 + i, 256) for i in range(3)]
    streams = []
    for prompt in prompts:
        stream = doomed.openai_client().completions.create(model="sim-model", prompt=prompt, max_tokens=LONG,
                                                          stream=True)
        first = next(iter(stream))
        assert first.choices[0].text
        streams.append(stream)
    os.kill(doomed.proc.pid, signal.SIGKILL)
    for stream, prompt in zip(streams, prompts, strict=True):
        # The stream ends in an error (a reset or a cut chunked body), never as a short success.
        finish, words, error = None, 0, None
        try:
            for chunk in stream:
                words += len(chunk.choices[0].text.split())
                finish = chunk.choices[0].finish_reason or finish
        except Exception as e:   # the client library's own transport error type
            error = e
        assert error is not None, f"the stream ended without an error after {words} words (finish: {finish})"
        assert finish is None
        retry = other.openai_client().completions.create(model="sim-model", prompt=prompt, max_tokens=8)
        assert len(retry.choices[0].text.split()) == 8 and retry.choices[0].finish_reason == "length"

    def idle() -> bool:   # the dead replica's upstream requests were cut too: nothing keeps generating
        running = 0.0
        for w in workers:
            for family in text_string_to_metric_families(w.metrics_text()):
                if family.name == "vllm:num_requests_running":
                    running += sum(s.value for s in family.samples)
        return running == 0

    wait_for(idle, 30, "the workers to drop the dead replica's requests")


def _two_free_ports_in_a_row() -> int:
    """A port p with p + 1 free too: two workers' admin listeners (adminPort + worker index)."""
    for _ in range(50):
        port = free_ports(1)[0]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free ports in a row on loopback")


def test_worker_processes_share_one_port(sim_worker_factory: Workers, router_factory: Routers) -> None:
    workers = [sim_worker_factory(*FAST) for _ in range(2)]
    ports = free_ports(2)
    admin = _two_free_ports_in_a_row()
    router = router_factory(model(workers), workers=2, workerPorts=ports, adminPort=admin)

    def up(port: int) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return bool(resp.status == 200)

    for port in ports:   # both processes have bound the shared port once their own answers
        wait_for(lambda port=port: up(port), 30, f"router worker on port {port}", router.proc)
    for i in range(24):   # a new connection each: the kernel spreads them over both processes
        assert served_by(router, block_text(800 + i, 64)).startswith("w")
    served = []
    for i, port in enumerate(ports):   # each process answers on its own port, with its own counts
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        served.append(sum(s.value for f in text_string_to_metric_families(text)
                          if f.name == "kvpilot_router_requests" for s in f.samples if s.name.endswith("_total")))
        # A stream this process does not hold: its own admin port answers "not_found", so a caller
        # asking each worker's admin port finds the owner.
        req = urllib.request.Request(f"http://127.0.0.1:{admin + i}/kvpilot/migrate", method="POST",
                                     data=json.dumps({"request_id": "nobody"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 404 and json.loads(err.value.read())["outcome"] == "not_found"
    assert sum(served) == 24 and min(served) > 0, served
