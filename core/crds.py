"""Pydantic models of kvpilot's custom resources, `LLMService` and `WorkerPool` (kvpilot.io/v1alpha1).

These models are the one source of truth: `python -P -m kvpilot.operator.crdgen` turns them into the
CRD YAML in `deploy/crds/` and `helm/kvpilot/crds/`, and the operator parses every object it reads
through them. Rules that the apiserver can check are attached as CEL `x-kubernetes-validations` and
mirrored by pydantic validators, so a unit test can show that both agree on the same examples.

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kvpilot.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# Longest suffix the operator appends ("-prefill", "-router") must still give a 63-character DNS label.
MAX_NAME_LENGTH = 52

EngineType = Literal["vllm", "simulator", "ray-serve"]
Mode = Literal["disaggregated", "aggregated"]
Role = Literal["prefill", "decode", "aggregated"]
MetricsSource = Literal["pods", "prometheus"]
RoutingPolicy = Literal["dualmap", "round-robin", "least-loaded", "consistent-hash", "cache-aware"]
KVBackend = Literal["redis", "nixl", "lmcache"]
Quantity = int | str


def cel(rule: str, message: str) -> dict[str, str]:
    """One CEL rule for the CRD schema (the pydantic validator beside it enforces the same)."""
    return {"rule": rule, "message": message}


def validations(rules: list[dict[str, str]]) -> dict[str, JsonValue]:
    """`json_schema_extra` that puts CEL rules on a model's schema."""
    return {"x-kubernetes-validations": cast(JsonValue, rules)}


class Model(BaseModel):
    """Base: camelCase aliases, unknown fields ignored (the apiserver prunes them anyway)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        """The object as the apiserver stores it: camelCase, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelSource(Model):
    name: str = Field(min_length=1, description="Model id, e.g. meta-llama/Llama-3.1-8B-Instruct.")
    uri: str | None = Field(None, pattern=r"^(hf|pvc|s3)://.+",
                            description="Where the weights are: hf://org/name, pvc://claim/path or s3://bucket/path. "
                                        "Defaults to the Hugging Face id in name.")
    served_name: str | None = Field(None, min_length=1,
                                    description="Model name clients send in requests (defaults to name).")

    def served(self) -> str:
        return self.served_name or self.name


class EnvVar(Model):
    name: str = Field(min_length=1)
    value: str | None = None
    value_from: dict[str, Any] | None = Field(None, description="As in a Pod's env[].valueFrom.")


class Engine(Model):
    type: EngineType = Field("vllm", description="vllm, simulator (kvpilot sim serve, no GPU needed) or ray-serve.")
    image: str | None = Field(None, min_length=1, description="Container image; a default per engine type if unset.")
    args: list[str] = Field(default_factory=list, description="Extra engine arguments, appended last.")
    env: list[EnvVar] = Field(default_factory=list)
    profile: str | None = Field(None, min_length=1,
                                description="Simulator hardware×model profile, e.g. h100-llama3-8b.")


class ResourceRequirements(Model):
    requests: dict[str, Quantity] | None = None
    limits: dict[str, Quantity] | None = None


POOL_RULES = [
    cel("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
        "minReplicas must be less than or equal to maxReplicas"),
    cel("!has(self.minReplicas) || self.replicas >= self.minReplicas",
        "replicas must be greater than or equal to minReplicas"),
    cel("!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
        "replicas must be less than or equal to maxReplicas"),
    cel("self.gpus == 0 || self.gpus % self.tensorParallel == 0",
        "gpus must be a multiple of tensorParallel"),
    cel("self.gpus == 0 || self.gpus % (self.tensorParallel * self.pipelineParallel) == 0",
        "gpus must be a multiple of tensorParallel × pipelineParallel"),
]


class PoolTemplate(Model):
    """How each replica of a pool runs; shared by LLMService pool specs and WorkerPools."""

    gpus: int = Field(1, ge=0, le=64, description="nvidia.com/gpu per replica (0 for the simulator on CPU).")
    tensor_parallel: int = Field(1, ge=1, le=64, description="vLLM --tensor-parallel-size.")
    pipeline_parallel: int = Field(1, ge=1, le=16, description=(
        "vLLM --pipeline-parallel-size. Under engine ray-serve each pipeline stage is one Ray worker pod "
        "(a node) of gpus / pipelineParallel GPUs, so a replica spans pipelineParallel nodes."))
    resources: ResourceRequirements | None = Field(None, description="Extra CPU/memory requests and limits.")
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    affinity: dict[str, Any] | None = None


class PoolSpec(PoolTemplate):
    model_config = ConfigDict(json_schema_extra=validations(POOL_RULES))

    replicas: int = Field(1, ge=0, description="Replicas when the pool is created; later the WorkerPool's own.")
    min_replicas: int | None = Field(None, ge=0, description="Autoscaler lower bound.")
    max_replicas: int | None = Field(None, ge=0, description="Autoscaler upper bound.")

    @model_validator(mode="after")
    def _bounds(self) -> PoolSpec:
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(POOL_RULES[0]["message"])
        if self.min_replicas is not None and self.replicas < self.min_replicas:
            raise ValueError(POOL_RULES[1]["message"])
        if self.max_replicas is not None and self.replicas > self.max_replicas:
            raise ValueError(POOL_RULES[2]["message"])
        if self.gpus and self.gpus % self.tensor_parallel:
            raise ValueError(POOL_RULES[3]["message"])
        if self.gpus and self.gpus % (self.tensor_parallel * self.pipeline_parallel):
            raise ValueError(POOL_RULES[4]["message"])
        return self


class Routing(Model):
    policy: RoutingPolicy = "dualmap"
    replicas: int = Field(2, ge=1, le=64, description="Router pods (spread over nodes, with a PodDisruptionBudget "
                                                       "that lets one go at a time).")
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block for prefix hashing.")
    migration: bool = Field(False, description="Move running streams off hot spots: live KV migration on "
                                               "simulator engines (needs a redis kvTransfer), resume on vLLM.")


class SLO(Model):
    ttft_ms: int = Field(2000, ge=1, description="Time-to-first-token target.")
    tpot_ms: int = Field(100, ge=1, description="Time-per-output-token target.")
    attainment: float = Field(0.9, gt=0, le=1, description="Share of requests that must meet both targets.")


class Autoscaling(Model):
    enabled: bool = False
    scale_up_stabilization_seconds: int = Field(0, ge=0)
    scale_down_stabilization_seconds: int = Field(300, ge=0)
    metrics_source: MetricsSource = Field(
        "pods", description="Where the autoscaler reads this service's engine metrics: pods (scrapes each pod's "
                            "/metrics) or prometheus (PromQL, from the Prometheus the autoscaler is given with "
                            "--prometheus-url).")


class KVTransfer(Model):
    backend: KVBackend = "nixl"
    redis_url: str | None = Field(None, alias="redisURL", pattern=r"^rediss?://.+")


SERVICE_RULES = [
    cel("self.mode == 'disaggregated' || !has(self.prefill)",
        "prefill is only used in disaggregated mode; an aggregated service runs the single pool from decode"),
    cel("!has(self.kvTransfer) || self.kvTransfer.backend != 'redis' || has(self.kvTransfer.redisURL)",
        "kvTransfer.redisURL is required when kvTransfer.backend is redis"),
    cel("!has(self.routing) || !has(self.routing.migration) || !self.routing.migration"
        " || !has(self.engine) || !has(self.engine.type) || self.engine.type != 'simulator'"
        " || (has(self.kvTransfer) && self.kvTransfer.backend == 'redis')",
        "routing.migration on simulator engines needs kvTransfer.backend redis (the KV moves through it)"),
]


class LLMServiceSpec(Model):
    model_config = ConfigDict(json_schema_extra=validations(SERVICE_RULES))

    model: ModelSource
    engine: Engine = Field(default_factory=Engine)
    mode: Mode = "disaggregated"
    prefill: PoolSpec | None = Field(None, description="The prefill pool (disaggregated mode only).")
    decode: PoolSpec | None = Field(None, description="The decode pool, or the single pool in aggregated mode.")
    routing: Routing = Field(default_factory=Routing)
    slo: SLO = Field(default_factory=SLO)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    kv_transfer: KVTransfer | None = None

    @model_validator(mode="after")
    def _mode(self) -> LLMServiceSpec:
        if self.mode == "aggregated" and self.prefill is not None:
            raise ValueError(SERVICE_RULES[0]["message"])
        if self.kv_transfer and self.kv_transfer.backend == "redis" and not self.kv_transfer.redis_url:
            raise ValueError(SERVICE_RULES[1]["message"])
        if self.routing.migration and self.engine.type == "simulator" and (
                self.kv_transfer is None or self.kv_transfer.backend != "redis"):
            raise ValueError(SERVICE_RULES[2]["message"])
        return self

    def pools(self) -> dict[Role, PoolSpec]:
        """The pools this spec asks for, by role; unset pools take the defaults."""
        if self.mode == "aggregated":
            return {"aggregated": self.decode or PoolSpec()}
        return {"prefill": self.prefill or PoolSpec(), "decode": self.decode or PoolSpec()}


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class PoolStatus(Model):
    desired: int = 0
    replicas: int = 0
    ready: int = 0


class ScalingStatus(Model):
    """The autoscaler's last decision for one pool, with its reason."""

    desired: int = 0
    current: int = 0
    ready: int = 0
    reason: str = ""
    metrics_source: MetricsSource | None = None
    last_decision_time: str | None = None


class LLMServiceStatus(Model):
    phase: Literal["Pending", "Progressing", "Ready", "Degraded"] | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    prefill: PoolStatus | None = None
    decode: PoolStatus | None = None
    router: PoolStatus | None = None
    endpoint: str | None = None
    autoscaling: dict[str, ScalingStatus] | None = Field(
        None, description="Per pool role: the autoscaler's last decision (written by the autoscaler).")


class LLMService(Model):
    """An LLM served by prefill and decode pools behind a KV-cache-aware router."""

    model_config = ConfigDict(json_schema_extra=validations([
        cel(f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child names add a suffix)")]))

    api_version: str = API_VERSION
    kind: str = "LLMService"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LLMServiceSpec
    status: LLMServiceStatus | None = None


class WorkerPoolSpec(PoolTemplate):
    model_config = ConfigDict(json_schema_extra=validations(POOL_RULES[:1]))

    service: str = Field(min_length=1, description="The LLMService this pool belongs to.")
    role: Role
    replicas: int = Field(1, ge=0, description="Desired replicas; written by kubectl scale, HPA or the autoscaler.")
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=0)
    model: ModelSource
    engine: Engine = Field(default_factory=Engine)
    kv_transfer: KVTransfer | None = None


class WorkerPoolStatus(Model):
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    selector: str = ""
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class WorkerPool(Model):
    """One role's engine replicas (prefill, decode or aggregated), owned by an LLMService."""

    api_version: str = API_VERSION
    kind: str = "WorkerPool"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: WorkerPoolSpec
    status: WorkerPoolStatus | None = None
