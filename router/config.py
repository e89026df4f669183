"""Router configuration: which models, which endpoints, which policy, which limits.

One YAML file (the operator renders it into a ConfigMap), validated by pydantic so that a typo
fails at start-up with a message, not at the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from kvpilot.router.migration_policy import MigrationConfig

Role = Literal["both", "prefill", "decode"]
# The endpoint role that serves each LLMService pool role (`kvpilot.crds.Role`): an aggregated
# pool's workers serve both phases. The operator's rendered config and local mode both use it.


class Endpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="stable identity (pod name): ring membership follows names, not URLs")
    url: HttpUrl
    role: Role = "both"
    kv_replay: str | None = Field(None, alias="kvReplay",
                                  description="the instance's KV-event replay socket (vLLM `replay_endpoint`), when "
                                              "it is not the endpoint's host at `kvEvents.replayPort`")


class Discovery(BaseModel):
    """Find endpoints as ready pods in a namespace, one label selector per role."""

    model_config = ConfigDict(extra="forbid")

    namespace: str
    port: int = Field(8000, gt=0, le=65535)
    pools: dict[Role, str] = Field(min_length=1, description="role → label selector")


class KVEvents(BaseModel):
    """Follow the engines' KV-cache events (vLLM `--kv-events-config`, `kvpilot.router.kv_events`):
    the router binds `bind`, each instance connects and publishes under its endpoint name as topic."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    bind: str = "tcp://0.0.0.0:5557"
    tokenizer: str | None = Field(None, description="tokenizer.json, a model dir or hf://org/name (the hub): to key "
                                                    "prompts like the engine")
    block_size: int = Field(128, gt=0, alias="blockSize", description="the engine's KV block size (CPU 128, GPU 16)")
    replay_port: int | None = Field(None, gt=0, le=65535, alias="replayPort",
                                    description="each instance's KV-event replay port (vLLM `replay_endpoint`): "
                                                "events missed while the router was away are fetched from there")


class HandoverConfig(BaseModel):
    """Cache-preserving scale-in and pre-warmed scale-out (`kvpilot.router.handover`): which
    prefixes count as hot, how many move, and the time bound of one handover."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = True
    window: int = Field(1000, gt=0, description="recent requests the hotness counts cover")
    min_hits: int = Field(2, gt=0, alias="minHits", description="requests in the window that make a prefix hot")
    max_prefixes: int = Field(64, gt=0, alias="maxPrefixes", description="the hottest prefixes moved per event")
    max_blocks: int = Field(32, gt=0, alias="maxBlocks", description="router blocks of a prompt's head kept per key")
    timeout_s: float = Field(10.0, gt=0, alias="timeoutSeconds", description="bound on one handover, all calls")


class KVTransfer(BaseModel):
    """How the model's engines move KV (the LLMService's `kvTransfer`, as far as the router needs
    it). `redis` on vLLM engines means they run kvpilot's connector: every engine saves what it
    computes to one shared store and loads what another saved, so a scale event's handover warms
    a pod by sending it the hot prefixes (`kvpilot.router.prewarm`) instead of exporting them."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    backend: Literal["nixl", "redis", "lmcache"] = "nixl"
    share_prefixes: bool = Field(
        False, alias="sharePrefixes",
        description="cross-instance prefix sharing: the routing policy's cost model counts a prefix any instance "
                    "was sent as a load from the store at every other instance, so when a prefix's owner is "
                    "overloaded the request may go to a less loaded one (DualMap's SLO switch and idle takeover). "
                    "Off: affinity alone (bench/results/prefix_sharing.md)")
    store_token_cost: float = Field(0.25, gt=0, le=1, alias="storeTokenCost",
                                    description="a token loaded from the store, in prefill tokens (sharePrefixes)")

    @model_validator(mode="after")
    def _sharing_needs_redis(self) -> KVTransfer:
        if self.share_prefixes and self.backend != "redis":
            raise ValueError("kvTransfer.sharePrefixes needs backend redis (a store every engine loads from)")
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="the served model name clients send")
    policy: str = "dualmap"
    mode: Literal["aggregated", "disaggregated"] = "aggregated"
    endpoints: list[Endpoint] = Field(default_factory=list)
    discovery: Discovery | None = None
    endpoints_file: Path | None = Field(None, alias="endpointsFile",
                                        description="endpoints from a file another process rewrites (local mode)")
    # The router's own hashing granularity: coarser than the engine's 16-token blocks keeps a
    # decision cheap (one hash per 256 tokens); affinity only needs prefix identity, not vLLM's hashes.
    block_size: int = Field(256, gt=0, alias="blockSize")
    max_hashed_blocks: int = Field(256, gt=0, alias="maxHashedBlocks")
    slo_ttft_ms: float = Field(2000, gt=0, alias="ttftMs")
    slo_tpot_ms: float = Field(100, gt=0, alias="tpotMs")
    prefill_token_s: float = Field(30e-6, gt=0, alias="prefillTokenSeconds",
                                   description="prior per-token prefill time (wall), calibrated online from TTFTs")
    kv_capacity_tokens: int = Field(400_000, gt=0, alias="kvCapacityTokens")
    max_inflight_per_endpoint: int = Field(256, gt=0, alias="maxInflightPerEndpoint")
    hold_requests: bool = Field(True, alias="holdRequests",
                                description="keep requests in router-side queues until their instance can start "
                                            "them (late binding, rebalancing); policies that hold: dualmap")
    max_queued: int = Field(1024, gt=0, alias="maxQueuedRequests",
                            description="router-side queue limit per pool; past it requests get 429")
    kv_events: KVEvents | None = Field(None, alias="kvEvents")
    migration: MigrationConfig | None = Field(None, description="migration of running streams")
    engine: Literal["simulator", "vllm"] = Field(
        "simulator", description="how streams migrate: simulator workers copy a running request's KV themselves; "
                                 "stock vLLM cannot, so the router moves its streams by resume (router/resume.py)")
    handover: HandoverConfig = Field(default_factory=HandoverConfig)
    kv_transfer: KVTransfer | None = Field(None, alias="kvTransfer")

    def shared_store(self) -> bool:
        """The engines are vLLM sharing kvpilot's Redis store (see `KVTransfer`)."""
        return self.engine == "vllm" and self.kv_transfer is not None and self.kv_transfer.backend == "redis"

    @model_validator(mode="after")
    def _roles_fit_mode(self) -> ModelConfig:
        from kvpilot.router.policies import POLICIES  # late: policies import this module's neighbours

        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; known: {', '.join(sorted(POLICIES))}")
        roles = {e.role for e in self.endpoints} | (set(self.discovery.pools) if self.discovery else set())
        if sum(bool(x) for x in (self.endpoints, self.discovery, self.endpoints_file)) > 1:
            raise ValueError(f"model {self.name!r}: give one of static endpoints, discovery or an endpoints file")
        if self.mode == "disaggregated" and roles and not {"prefill", "decode"} <= roles:
            raise ValueError(f"model {self.name!r} is disaggregated but lacks prefill or decode endpoints")
        names = [e.name for e in self.endpoints]
        if len(names) != len(set(names)):
            raise ValueError(f"model {self.name!r} has duplicate endpoint names")
        return self


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="router processes sharing the port (SO_REUSEPORT), one per core")
    worker_ports: list[int] = Field(default_factory=list, alias="workerPorts",
                                    description="with several workers, worker i's own port (for calls that must "
                                                "reach it: its streams' migration, its metrics); default port + 1 + i")
    models: list[ModelConfig] = Field(min_length=1)
    scrape_interval_s: float = Field(
        0.25, gt=0, alias="scrapeIntervalSeconds",
        description="how often each engine's /metrics is polled: its load (running, waiting, KV usage) is how "
                    "active-active router replicas see each other's requests, so a short interval")
    request_timeout_s: float = Field(600.0, gt=0, alias="requestTimeoutSeconds")
    connect_timeout_s: float = Field(2.0, gt=0, alias="connectTimeoutSeconds")
    max_retries: int = Field(2, ge=0, alias="maxRetries")
    breaker_failures: int = Field(3, gt=0, alias="breakerFailures")
    breaker_cooldown_s: float = Field(10.0, gt=0, alias="breakerCooldownSeconds")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, alias="maxBodyBytes")
    hold_tick_s: float = Field(0.05, gt=0, alias="holdTickSeconds",
                               description="how often held requests are rebalanced and re-checked for release")
    hold_bypass_lag_s: float = Field(
        0.02, ge=0, alias="holdBypassLagSeconds",
        description="when the router's own event loop runs this late (the router is CPU-bound), new requests skip "
                    "the router-side queues until it catches up: first tokens then reach the router late, every "
                    "backlog looks full, and holding only adds delay; 0 never bypasses")
    cold_start_queue: int = Field(256, gt=0, alias="coldStartQueue",
                                  description="requests per model held while its pools wake from zero replicas; "
                                              "past it requests get 429")
    cold_start_timeout_s: float = Field(300.0, gt=0, alias="coldStartTimeoutSeconds",
                                        description="how long a request waits for a pool to wake from zero before "
                                                    "it gets 503 (a GPU node and a model load can take minutes)")
    seed: int = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="logLevel")
    log_format: Literal["json", "text"] = Field("json", alias="logFormat")
    # Credentials and the admin listener (`kvpilot.router.auth`, `kvpilot.router.admin`).
    api_keys_file: Path | None = Field(None, alias="apiKeysFile",
                                       description="client API keys and their limits (`kvpilot.router.keys`); "
                                                   "None: no key is needed")
    api_keys_reload_s: float = Field(2.0, gt=0, alias="apiKeysReloadSeconds",
                                     description="how often the keys file (and the admin token) is checked for changes")
    admin_host: str = Field("127.0.0.1", alias="adminHost", description="the admin listener's address")
    admin_port: int | None = Field(None, ge=0, le=65535, alias="adminPort",
                                   description="the admin listener (migrate, handover, debug, dashboard); "
                                               "None: `port` + 1 (0 with `port` 0); worker i of `workers` "
                                               "serves its own on this + i")
    admin_token_file: Path | None = Field(None, alias="adminTokenFile",
                                          description="the admin endpoints' bearer token; None: none needed")

    def admin_listen_port(self) -> int:
        if self.admin_port is not None:
            return self.admin_port
        return self.port + 1 if self.port else 0

    @model_validator(mode="after")
    def _worker_ports(self) -> RouterConfig:
        if self.worker_ports and len(self.worker_ports) != self.workers:
            raise ValueError(f"workerPorts lists {len(self.worker_ports)} ports for {self.workers} workers")
        return self

    @classmethod
    def load(cls, path: Path) -> RouterConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()))
