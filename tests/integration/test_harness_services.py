"""Redis, Prometheus and process management from the test harness, against the real programs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry, Counter, start_http_server

from kvpilot.procs import ManagedProcess, free_port, pid_alive, tcp_open, wait_for
from kvpilot.testing.prometheus import PrometheusServer
from kvpilot.testing.redis import RedisServer


def test_redis_round_trip(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    payload = os.urandom(4096)
    client.set("kvpilot:test:blob", payload, ex=30)
    assert client.get("kvpilot:test:blob") == payload
    assert client.config_get("save")["save"] == ""  # no persistence in tests


def test_prometheus_scrapes_client_endpoint_and_answers_promql(prometheus_factory) -> None:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    counter = Counter("kvpilot_harness_probe", "incremented by the test", registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        counter.inc(7)
        prom: PrometheusServer = prometheus_factory([f"127.0.0.1:{port}"])

        def scraped() -> bool:
            result = prom.query("kvpilot_harness_probe_total")
            return bool(result) and float(result[0]["value"][1]) == 7.0

        wait_for(scraped, 30, "prometheus to scrape the probe counter", prom.proc)
        up = prom.query(f'up{{instance="127.0.0.1:{port}"}}')
        assert up and up[0]["value"][1] == "1"
    finally:
        server.shutdown()
        thread.join(5)


def test_managed_process_stop_kills_grandchildren(tmp_path: Path) -> None:
    """A child that spawns its own child must not leave it behind when stopped."""
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n"
    )
    proc = ManagedProcess("spawner", [sys.executable, "-c", script], tmp_path / "spawner.log")
    wait_for(lambda: pid_file.exists() and pid_file.read_text() != "", 10, "grandchild pid", proc)
    grandchild = int(pid_file.read_text())
    proc.stop(timeout=5)
    assert not proc.alive()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(grandchild):
        time.sleep(0.05)
    assert not pid_alive(grandchild)


def test_redis_server_stop_frees_port(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    pid = server.proc.pid
    server.stop()
    assert not pid_alive(pid)
    assert not tcp_open(server.host, server.port)
