"""Local mode: the control plane on one machine with simulated GPUs (`kvpilot up`).

Reads the same `LLMService` spec the operator reads, starts each pool's `kvpilot sim serve`
workers and a `kvpilot router` in front of them as real processes on loopback and, when the
spec turns autoscaling on, runs the autoscaler with a local actuator that starts and stops
workers. The router learns the healthy workers from an endpoints file this process rewrites
(`router.endpoints_file`). Everything stops on exit (Ctrl-C, SIGTERM, or leaving the `with`
block): no orphan process, no port left.

Workers run `time_scale` times faster than the GPUs they model and report latencies in
modelled time, so the autoscaler runs on a modelled-time clock too: its interval and the
scale-down window read as on the real hardware.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml
from prometheus_client import CollectorRegistry

from kvpilot.autoscaler.actuators import PoolRef, PoolState
from kvpilot.autoscaler.controller import Metrics
from kvpilot.autoscaler.planner import Role
from kvpilot.crds import LLMService
from kvpilot.names import POOL_ENDPOINT_ROLE, pool_name
from kvpilot.procs import ManagedProcess, free_port, tcp_open, wait_for
from kvpilot.router.config import Endpoint
from kvpilot.router.endpoints_file import EndpointsDoc, write_endpoints
from kvpilot.sim.profiles import get_profile

if TYPE_CHECKING:
    from kvpilot.local_monitoring import LocalMonitoring

log = logging.getLogger("kvpilot.local")

DEFAULT_SPEC = """
apiVersion: kvpilot.io/v1alpha1
kind: LLMService
metadata: {name: local}
spec:
  model: {name: meta-llama/Llama-3.1-8B-Instruct, servedName: llama-8b}
  engine: {type: simulator, profile: h100-llama3-8b}
  mode: aggregated
  decode: {replicas: 4, minReplicas: 2, maxReplicas: 8}
  routing: {policy: dualmap}
  slo: {ttftMs: 5000, tpotMs: 100, attainment: 0.9}
  autoscaling: {enabled: true, scaleDownStabilizationSeconds: 120}
"""
DRAIN_S = 5.0  # wall seconds a removed worker keeps serving what it already has
HANDOVER_S = 10.0  # modelled seconds one scale-event handover may take (the router's bound, in its wall time)


def load_service(path: Path | None) -> LLMService:
    text = path.read_text() if path else DEFAULT_SPEC
    return LLMService.model_validate(yaml.safe_load(text))


def _kvpilot(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "kvpilot.cli", *args]


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=1) as resp:
        return bool(resp.status == 200)


@dataclass
class Worker:
    name: str
    role: str                      # the pool's role: aggregated | prefill | decode
    url: str
    proc: ManagedProcess
    seq: int = 0                   # start order: the newest is retired first
    healthy: bool = False
    drain_until: float | None = None
    handover: threading.Event | None = None   # set once the router's handover for it is done


@dataclass(frozen=True)
class ScalingEvent:
    time: float                    # wall clock (epoch seconds)
    pool: str
    before: int
    after: int
    reason: str


class LocalControlPlane:
    """Workers, the router and (if enabled) the autoscaler for one LLMService; a context manager."""

    def __init__(self, service: LLMService, *, time_scale: float = 1.0, policy: str | None = None,
                 port: int | None = None, workdir: Path | None = None, autoscale: bool | None = None,
                 interval_s: float = 10.0, prometheus: bool = False, scrape_interval: str = "5s") -> None:
        self.service = service
        self.time_scale = time_scale
        self.policy = policy or service.spec.routing.policy
        self.port = port or free_port()
        self.admin_port = free_port()  # the router's admin listener (dashboard, handover, migrate), loopback
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="kvpilot-local-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.autoscale = service.spec.autoscaling.enabled if autoscale is None else autoscale
        self.interval_s = interval_s   # modelled seconds between autoscaler decisions
        self.procs: list[ManagedProcess] = []
        self.pool: dict[str, Worker] = {}
        self.events: list[ScalingEvent] = []
        self.replicas: list[tuple[float, int]] = []   # (wall time, serving workers) after each change
        self._lock = threading.RLock()
        self._seq = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._endpoints_path = self.dir / "endpoints.yaml"
        self.kv_store: str | None = None   # Redis URL workers hand KV over through (P/D, scale events), if any
        self._serving = False              # the router is up: scale events get a prefix handover
        self.prometheus = prometheus       # run Prometheus (and the dashboards' viewer) beside the stack
        self.scrape_interval = scrape_interval
        self.registry = CollectorRegistry()   # the autoscaler's metrics, scraped through the console
        self.monitoring: LocalMonitoring | None = None
        self.metrics: Metrics | None = None

    @property
    def name(self) -> str:
        return str(self.service.metadata.get("name", "local"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The router's admin endpoints (`/dashboard`, `/kvpilot/handover`, `/kvpilot/migrate`)."""
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def model(self) -> str:
        return self.service.spec.model.served()

    @property
    def workers(self) -> dict[str, str]:
        """Serving workers: name → URL."""
        with self._lock:
            return {w.name: w.url for w in self.pool.values() if w.healthy and w.drain_until is None}

    # -- workers -----------------------------------------------------------------------------
    def _spawn(self, role: str) -> Worker:
        spec = self.service.spec
        self._seq += 1
        name = f"{self.name}-{role}-{self._seq}"
        port = free_port()
        args = ["sim", "serve", "--profile", spec.engine.profile or "h100-llama3-8b", "--model", self.model,
                "--port", str(port), "--time-scale", str(self.time_scale)]
        if self.kv_store:
            args += ["--kv-store", self.kv_store]
        proc = ManagedProcess(name, _kvpilot(*args), self.dir / f"{name}.log")
        worker = Worker(name, role, f"http://127.0.0.1:{port}", proc, self._seq)
        self.pool[name] = worker
        return worker

    def resize(self, role: str, n: int) -> None:
        """Start or retire workers of one pool until `n` are live. A retired worker leaves the
        router's endpoints at once and is stopped after a short drain."""
        with self._lock:
            live = [w for w in self.pool.values() if w.role == role and w.drain_until is None]
            for _ in range(n - len(live)):
                self._spawn(role)
            # Retire the ones not serving yet first, then the newest (the coldest cache).
            for w in sorted(live, key=lambda w: (w.healthy, -w.seq))[:max(0, len(live) - n)]:
                w.drain_until = time.monotonic() + (DRAIN_S if w.healthy else 0.0)
                if w.healthy and self._handovers and w.role != "decode":
                    self._handover(w, "leaving")
            self._publish()

    @property
    def _handover_wait_s(self) -> float:
        """Wall seconds to wait for the router's answer: its bound and a margin. A joining worker
        serves nothing until it returns, so the bound is in modelled time: at time scale 10 a
        10 s wall bound kept a new replica idle for 100 modelled seconds under load."""
        return HANDOVER_S / self.time_scale + 5.0

    @property
    def _handovers(self) -> bool:
        """Scale events move hot prefixes when the router is up and workers share a KV store."""
        return self._serving and self.kv_store is not None

    def _handover(self, w: Worker, kind: str) -> None:
        """Ask the router to hand `w`'s hot prefixes over (`leaving`: to its ring successors,
        before `refresh` stops it) or to pre-warm it (`joining`: before it is published)."""
        w.handover = threading.Event()
        done = w.handover

        def run() -> None:
            body = json.dumps({"model": self.model, kind: w.name, "url": w.url}).encode()
            req = urllib.request.Request(self.admin_url + "/kvpilot/handover", body,
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self._handover_wait_s) as resp:
                    log.info("handover %s %s: %s", kind, w.name, json.loads(resp.read()).get("outcome"))
            except (OSError, ValueError) as e:
                log.warning("handover %s %s failed: %s", kind, w.name, e)
            finally:
                done.set()
                if kind == "joining":
                    with self._lock:
                        if self.pool.get(w.name) is w and w.drain_until is None:
                            w.healthy = True
                            self._publish()

        self._thread(run, f"handover-{w.name}")

    def refresh(self) -> None:
        """Health-check starting workers, stop drained ones, publish the serving set."""
        with self._lock:
            changed = False
            for w in list(self.pool.values()):
                if w.drain_until is not None:
                    now = time.monotonic()
                    handing_over = w.handover is not None and not w.handover.is_set()
                    if now >= w.drain_until and (not handing_over or now >= w.drain_until + self._handover_wait_s):
                        w.proc.stop()
                        del self.pool[w.name]
                    continue
                if not w.healthy and w.handover is None:
                    try:
                        up = _healthy(w.url)
                    except OSError:
                        up = False
                    if up and self._handovers and w.role != "decode":  # P/D: the prefill pool holds the cache
                        self._handover(w, "joining")  # published once pre-warmed
                    elif up:
                        w.healthy = changed = True
            if changed:
                self._publish()

    def _publish(self) -> None:
        serving = [w for w in self.pool.values() if w.healthy and w.drain_until is None]
        eps = [Endpoint(name=w.name, url=w.url, role=POOL_ENDPOINT_ROLE[w.role]) for w in serving]
        events = [{"time": e.time, "pool": e.pool, "from": e.before, "to": e.after, "reason": e.reason}
                  for e in self.events[-50:]]
        write_endpoints(self._endpoints_path, EndpointsDoc(endpoints=eps, events=events))
        if self.monitoring is not None:
            self.monitoring.engines((w.name, w.role, pool_name(self.name, cast(Role, w.role)), w.url) for w in serving)
        if not self.replicas or self.replicas[-1][1] != len(serving):
            self.replicas.append((time.time(), len(serving)))

    def state(self, role: str) -> PoolState:
        with self._lock:
            live = [w for w in self.pool.values() if w.role == role and w.drain_until is None]
            ready = [w.url for w in live if w.healthy]
            return PoolState(len(live), len(ready), sorted(ready), (self.url,) if self._serving else ())

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LocalControlPlane:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_kv_store(self) -> None:
        """P/D hands KV over through Redis, and so do scale events under DualMap (a retired
        worker's hot prefixes to its ring successors, a new worker's pre-warm): the spec's Redis,
        else a private one when redis-server is installed. Without either, P/D workers hand KV
        over directly to each other and scale events leave the moved prefixes to recompute."""
        spec = self.service.spec
        if spec.mode != "disaggregated" and self.policy != "dualmap":
            return
        if spec.kv_transfer is not None and spec.kv_transfer.redis_url:
            self.kv_store = spec.kv_transfer.redis_url
            return
        binary = shutil.which("redis-server")
        if binary is None:
            log.info("redis-server not installed: P/D workers hand KV over directly; scale events hand no "
                     "prefixes over")
            return
        port = free_port()
        redis = ManagedProcess("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], self.dir / "redis.log")
        self.procs.append(redis)
        wait_for(lambda: tcp_open("127.0.0.1", port), 10, "redis-server", redis)
        self.kv_store = f"redis://127.0.0.1:{port}/0"

    def _start(self) -> None:
        spec = self.service.spec
        if self.prometheus:
            from kvpilot.local_monitoring import NAMESPACE, LocalMonitoring

            self.monitoring = LocalMonitoring(self.name, self.registry, self.dir / "prometheus", self.scrape_interval)
            self.metrics = Metrics(self.registry)
            self.metrics.service(NAMESPACE, self.name, spec)   # the SLO, with or without autoscaling
        self._start_kv_store()
        with self._lock:
            for role, pool in spec.pools().items():
                for _ in range(pool.replicas):
                    self._spawn(role)
        for w in list(self.pool.values()):
            wait_for(functools.partial(_healthy, w.url), 30, f"worker {w.name}", w.proc)
            w.healthy = True
        with self._lock:
            self._publish()
        config = {"host": "127.0.0.1", "port": self.port, "adminPort": self.admin_port, "models": [{
            "name": self.model, "policy": self.policy, "mode": spec.mode,
            "endpointsFile": str(self._endpoints_path),
            # The router measures wall time; workers run time_scale× faster than the modelled GPUs.
            "ttftMs": spec.slo.ttft_ms / self.time_scale, "tpotMs": spec.slo.tpot_ms / self.time_scale,
            # The predictor's prior, in the router's wall time: the modelled GPU's, time_scale× faster.
            "prefillTokenSeconds": get_profile(spec.engine.profile or "h100-llama3-8b").prefill_token_s
            / self.time_scale,
            # As the operator renders it: running streams move off hot spots (the KV through Redis).
            **({"migration": {"enabled": True, "tpotMs": spec.slo.tpot_ms / self.time_scale}}
               if spec.routing.migration else {}),
            "handover": {"timeoutSeconds": HANDOVER_S / self.time_scale}}]}
        cfg_path = self.dir / "router.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        router = ManagedProcess("router", _kvpilot("router", "--config", str(cfg_path)), self.dir / "router.log")
        self.procs.append(router)
        wait_for(lambda: _healthy(self.url), 30, "the router", router)
        if self.monitoring is not None:
            self.monitoring.router(self.url)
        self._serving = True
        self._thread(self._maintain, "local-pools")
        if self.autoscale:
            self._thread(self._autoscale, "local-autoscaler")

    def _thread(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _maintain(self) -> None:
        while not self._stop.wait(0.25):
            self.refresh()

    def _autoscale(self) -> None:
        from kvpilot.autoscaler.controller import Autoscaler
        from kvpilot.autoscaler.planner import PlannerConfig

        cold_start = 2.0 * self.time_scale  # a worker process is serving about 2 wall seconds after start
        scaler = Autoscaler(LocalActuator(self), clock=lambda: time.monotonic() * self.time_scale,
                            base=PlannerConfig(forecast_s=2 * cold_start + self.interval_s), metrics=self.metrics)
        raw = self.service.spec.model_dump(by_alias=True, exclude_none=True)
        while not self._stop.wait(self.interval_s / self.time_scale):
            for d in scaler.tick([("local", self.name, raw)]):
                if d.action != "hold":
                    with self._lock:
                        self.events.append(ScalingEvent(time.time(), d.pool.role, d.asked, d.desired, d.reason))
                        self._publish()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:   # first: quick, and nothing is left to watch (_publish holds the lock)
            mon, self.monitoring = self.monitoring, None
        if mon is not None:
            mon.stop()
        for t in self._threads:
            t.join(timeout=5)
        with self._lock:
            for w in self.pool.values():
                w.proc.stop()
            self.pool.clear()
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def __enter__(self) -> LocalControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalActuator:
    """The autoscaler's actuator for local mode: pool sizes are worker processes."""

    def __init__(self, plane: LocalControlPlane) -> None:
        self.plane = plane

    def observe(self, pool: PoolRef) -> PoolState | None:
        return self.plane.state(pool.role)

    def scale(self, pool: PoolRef, replicas: int) -> None:
        self.plane.resize(pool.role, replicas)
