"""Rendering children is a pure function: check the objects an LLMService and its WorkerPools become."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kvpilot import names
from kvpilot.crds import LLMServiceSpec, WorkerPoolSpec
from kvpilot.names import POOL_ENDPOINT_ROLE
from kvpilot.operator import render, render_pool
from kvpilot.operator.poddefaults import HF_CACHE_PATH, PodDefaults
from kvpilot.router.config import RouterConfig

OWNER = render.Owner("kvpilot.io/v1alpha1", "LLMService", "llama", "ml", "uid-1")


def _spec(**overrides: Any) -> LLMServiceSpec:
    base: dict[str, Any] = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
                            "engine": {"type": "vllm"}, "prefill": {"replicas": 2, "gpus": 2, "tensorParallel": 2},
                            "decode": {"replicas": 3}}
    return LLMServiceSpec.model_validate({**base, **overrides})


def _pool(spec: LLMServiceSpec, role: str) -> tuple[WorkerPoolSpec, render.Owner]:
    obj = next(p for p in render.workerpools(spec, OWNER) if p["spec"]["role"] == role)
    owner = render.Owner("kvpilot.io/v1alpha1", "WorkerPool", obj["metadata"]["name"], "ml", "uid-pool")
    return WorkerPoolSpec.model_validate(obj["spec"]), owner


def test_disaggregated_gives_prefill_and_decode_pools_owned_by_the_service() -> None:
    pools = render.workerpools(_spec(), OWNER)
    assert [(p["metadata"]["name"], p["spec"]["role"], p["spec"]["replicas"]) for p in pools] == [
        ("llama-prefill", "prefill", 2), ("llama-decode", "decode", 3)]
    for pool in pools:
        assert pool["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert "replicas" not in render.without_replicas(pool)["spec"]


def test_aggregated_gives_one_worker_pool_from_decode() -> None:
    spec = _spec(mode="aggregated", prefill=None)
    pools = render.workerpools(spec, OWNER)
    assert [(p["metadata"]["name"], p["spec"]["role"], p["spec"]["replicas"]) for p in pools] == [
        ("llama-worker", "aggregated", 3)]
    pool, _ = _pool(spec, "aggregated")
    _, args = render_pool.engine_command(pool)
    assert "--kv-transfer-config" not in args and "--enable-prefix-caching" in args


def test_vllm_prefill_args_gpus_and_probes() -> None:
    pool, owner = _pool(_spec(), "prefill")
    dep = render_pool.pool_deployment(pool, owner)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["vllm", "serve"]
    args = container["args"]
    assert args[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--served-model-name") + 1] == "llama-8b"
    kv = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert kv == {"kv_connector": "NixlConnector", "kv_role": "kv_producer"}  # GPUs: vLLM's default buffer
    events = json.loads(args[args.index("--kv-events-config") + 1])
    assert events["endpoint"] == f"tcp://llama-router:{render.KV_EVENTS_PORT}" and events["topic"] == "$(POD_NAME)"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["selector"]["matchLabels"] == {names.LABEL_POOL: "llama-prefill"}
    assert dep["metadata"]["ownerReferences"][0]["kind"] == "WorkerPool"


def test_vllm_pipeline_parallel_only_when_asked() -> None:
    pool, _ = _pool(_spec(prefill={"gpus": 4, "tensorParallel": 2, "pipelineParallel": 2}), "prefill")
    _, args = render_pool.engine_command(pool)
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"
    _, args = render_pool.engine_command(_pool(_spec(), "prefill")[0])
    assert "--pipeline-parallel-size" not in args


def test_redis_backend_renders_kvpilots_connector_on_both_sides() -> None:
    spec = _spec(kvTransfer={"backend": "redis", "redisURL": "redis://127.0.0.1:6379"})
    for role in ("prefill", "decode"):
        pool, _ = _pool(spec, role)
        kv = render_pool.kv_transfer_config(pool)
        assert kv["kv_connector"] == "KvpilotRedisConnector" and kv["kv_role"] == "kv_both"
        assert kv["kv_connector_module_path"] == "kvpilot.kvtransfer.vllm_connector"
        assert kv["kv_load_failure_policy"] == "recompute"  # vLLM's default "fail" would fail the request
        assert kv["kv_connector_extra_config"] == {"redis_url": "redis://127.0.0.1:6379"}
        assert not any(e["name"] == "VLLM_NIXL_SIDE_CHANNEL_HOST" for e in render_pool.engine_env(pool))


def test_simulator_runs_kvpilot_sim_serve_with_its_profile() -> None:
    spec = _spec(engine={"type": "simulator", "profile": "h100-qwen2.5-7b", "args": ["--time-scale", "10"]})
    pool, owner = _pool(spec, "decode")
    container = render_pool.pool_deployment(pool, owner)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kvpilot"]
    assert container["args"] == ["sim", "serve", "--profile", "h100-qwen2.5-7b", "--model", "llama-8b",
                                 "--host", "0.0.0.0", "--port", "8000", "--time-scale", "10"]
    assert container["image"].startswith("ghcr.io/kvpilot/kvpilot:")


def test_pvc_model_is_mounted_and_passed_as_a_path() -> None:
    spec = _spec(model={"name": "m", "uri": "pvc://weights/llama/8b"})
    pool, owner = _pool(spec, "decode")
    pod = render_pool.pool_deployment(pool, owner)["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][0] == "/models/weights/llama/8b"
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]


def test_scheduling_fields_reach_the_pod() -> None:
    spec = _spec(decode={"nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "nvidia.com/gpu",
                                                                            "operator": "Exists"}]})
    pool, owner = _pool(spec, "decode")
    pod = render_pool.pool_deployment(pool, owner)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_headless_service_selects_the_pool() -> None:
    pool, owner = _pool(_spec(), "decode")
    svc = render_pool.pool_service(pool, owner)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {names.LABEL_POOL: "llama-decode"}


def test_router_config_selectors_match_engine_pod_labels() -> None:
    spec = _spec()
    objs = {o["kind"]: o for o in render.router_objects(spec, OWNER, "img:1")}
    assert set(objs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "PodDisruptionBudget",
                         "Service"}
    container = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kvpilot", "router", "--config", render.ROUTER_CONFIG]
    config = render.router_config(spec, OWNER)
    for role in ("prefill", "decode"):
        pool, owner = _pool(spec, role)
        labels = render_pool.pool_deployment(pool, owner)["spec"]["template"]["metadata"]["labels"]
        selector = config["models"][0]["discovery"]["pools"][POOL_ENDPOINT_ROLE[role]]
        wanted = dict(kv.split("=") for kv in selector.split(","))
        assert wanted.items() <= labels.items()
    # The router accepts what the operator renders (one schema, checked at both ends).
    parsed = RouterConfig.model_validate(config)
    assert parsed.models[0].mode == "disaggregated" and parsed.models[0].discovery is not None
    assert parsed.models[0].engine == spec.engine.type == "vllm"   # its streams migrate by resume
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == "uid-1" for o in objs.values())


def test_router_admin_port_is_on_the_pod_but_not_the_client_service() -> None:
    objs = {o["kind"]: o for o in render.router_objects(_spec(), OWNER, "img:1")}
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports["admin"] == render.ADMIN_PORT != ports["http"]
    assert render.ADMIN_PORT not in {p["port"] for p in objs["Service"]["spec"]["ports"]}
    assert all(p["targetPort"] != "admin" for p in objs["Service"]["spec"]["ports"])
    config = RouterConfig.model_validate(render.router_config(_spec(), OWNER))
    assert config.admin_listen_port() == render.ADMIN_PORT and config.admin_token_file is not None
    secret_volume = next(v for v in pod["volumes"] if v["name"] == "admin")
    secret = render.admin_secret(OWNER, "t0k3n")
    assert secret_volume["secret"]["secretName"] == secret["metadata"]["name"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "admin")
    assert str(config.admin_token_file).startswith(mount["mountPath"] + "/") and list(secret["stringData"]) == [
        config.admin_token_file.name]
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"   # deleted with its service


def test_router_pods_roll_when_the_config_changes() -> None:
    def digest(spec: LLMServiceSpec) -> str:
        dep = next(o for o in render.router_objects(spec, OWNER) if o["kind"] == "Deployment")
        return str(dep["spec"]["template"]["metadata"]["annotations"]["kvpilot.io/config-hash"])

    assert digest(_spec()) == digest(_spec())
    assert digest(_spec()) != digest(_spec(routing={"policy": "round-robin"}))


def test_simulator_pd_over_redis_gets_the_kv_store_flag() -> None:
    import argparse

    from kvpilot.sim.cli import register

    spec = _spec(engine={"type": "simulator", "profile": "h100-qwen2.5-0.5b"},
                 kvTransfer={"backend": "redis", "redisURL": "redis://kv-redis:6379/0"})
    for role in ("prefill", "decode"):
        pool, _ = _pool(spec, role)
        command, args = render_pool.engine_command(pool)
        assert command == ["kvpilot"] and args[args.index("--kv-store") + 1] == "redis://kv-redis:6379/0"
        # The simulator's own CLI accepts exactly what the operator renders.
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="command"))
        parsed = parser.parse_args(args)
        assert parsed.kv_store == "redis://kv-redis:6379/0" and parsed.profile == "h100-qwen2.5-0.5b"
    plain, _ = _pool(_spec(engine={"type": "simulator"}), "decode")
    assert "--kv-store" not in render_pool.engine_command(plain)[1]


def test_pod_monitor_scrapes_every_pod_of_the_service_on_http_metrics() -> None:
    monitor = render.pod_monitor(OWNER)
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics"}]
    # The selector picks every engine pod and the router pod of this service, and nothing else.
    spec = _spec()
    pod_labels = [render_pool.pool_deployment(*_pool(spec, role))["spec"]["template"]["metadata"]["labels"]
                  for role in ("prefill", "decode")]
    router = next(o for o in render.router_objects(spec, OWNER) if o["kind"] == "Deployment")
    pod_labels.append(router["spec"]["template"]["metadata"]["labels"])
    for labels in pod_labels:
        assert selector.items() <= labels.items()
        assert labels[names.LABEL_COMPONENT] in ("engine", "router")
    other = render_pool.pool_deployment(*_pool(spec, "decode"))["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= {**other, names.LABEL_SERVICE: "other"}.items()
    for dep in [render_pool.pool_deployment(*_pool(spec, "decode")), router]:
        ports = dep["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert {"name": "http", "containerPort": render.PORT} in ports


def test_engine_pods_drain_before_sigterm_within_their_grace_period() -> None:
    """The router hands a leaving pod's hot KV to its successors while the pod still answers."""
    for engine in ({"type": "simulator"}, {"type": "vllm"}):
        pool, owner = _pool(_spec(engine=engine), "decode")
        pod = render_pool.pool_deployment(pool, owner)["spec"]["template"]["spec"]
        drain = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert 0 < drain < pod["terminationGracePeriodSeconds"]


def test_routing_migration_renders_a_router_config_the_router_accepts() -> None:
    from pydantic import ValidationError

    from kvpilot.router.config import RouterConfig

    spec = _spec(routing={"migration": True}, slo={"tpotMs": 80})
    model = RouterConfig.model_validate(render.router_config(spec, OWNER)).models[0]
    assert model.engine == "vllm" and model.migration is not None and model.migration.enabled
    assert model.migration.slo_tpot_ms == 80
    assert "migration" not in render.router_config(_spec(), OWNER)["models"][0]
    try:  # the simulator moves KV through the store, so it needs one
        _spec(engine={"type": "simulator"}, routing={"migration": True})
        raise AssertionError("accepted migration on simulator engines without a redis kvTransfer")
    except ValidationError as e:
        assert "needs kvTransfer.backend redis" in str(e)


def test_the_router_reads_the_engines_tokenizer_from_where_the_engine_reads_its_model() -> None:
    """KV events are keyed by token ids: the router needs the model's tokenizer and chat template."""
    def router(spec: LLMServiceSpec) -> tuple[Any, dict[str, Any]]:
        dep = next(o for o in render.router_objects(spec, OWNER) if o["kind"] == "Deployment")
        kv = RouterConfig.model_validate(render.router_config(spec, OWNER)).models[0].kv_events
        return kv, dep["spec"]["template"]["spec"]

    hf_token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    kv, pod = router(_spec(engine={"type": "vllm", "env": [hf_token, {"name": "OTHER", "value": "x"}]}))
    assert kv is not None and kv.tokenizer == "hf://meta-llama/Llama-3.1-8B-Instruct"
    env = pod["containers"][0]["env"]
    assert hf_token in env and all(e["name"] != "OTHER" for e in env), "only the hub's settings follow"
    assert [v["name"] for v in pod["volumes"]] == ["config", "admin"]

    kv, pod = router(_spec(model={"name": "m", "uri": "pvc://weights/llama/8b"}))
    assert kv is not None and kv.tokenizer == "/models/weights/llama/8b"   # the engine's model path
    claim = {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
    assert claim in pod["volumes"]
    assert {"name": "model", "mountPath": "/models/weights", "readOnly": True} in pod["containers"][0]["volumeMounts"]

    kv, _ = router(_spec(model={"name": "m", "uri": "s3://bucket/llama"}))
    assert kv is not None and kv.tokenizer is None, "the router does not stream from S3"


def test_router_replicas_spread_over_nodes_with_a_budget() -> None:
    objs = {o["kind"]: o for o in render.router_objects(_spec(), OWNER)}
    dep, pdb = objs["Deployment"], objs["PodDisruptionBudget"]
    assert dep["spec"]["replicas"] == 2   # the CRD's default
    selector = dep["spec"]["selector"]["matchLabels"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items() for c in spread)
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread)   # one node still runs them all
    three = next(o for o in render.router_objects(_spec(routing={"replicas": 3}), OWNER) if o["kind"] == "Deployment")
    assert three["spec"]["replicas"] == 3


def test_each_pool_has_a_budget_over_its_own_pods() -> None:
    pool, owner = _pool(_spec(), "decode")
    pdb = render_pool.pool_disruption_budget(pool, owner)
    pod_labels = render_pool.pool_deployment(pool, owner)["spec"]["template"]["metadata"]["labels"]
    assert pdb["metadata"]["name"] == "llama-decode" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == {render.LABEL_POOL: "llama-decode"}
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == "uid-pool"


DEFAULTS = PodDefaults.parse({
    "imagePullSecrets": ["regcred"], "priorityClassName": "llm-serving",
    "extraVolumes": [{"name": "certs", "secret": {"secretName": "ca"}}],
    "extraVolumeMounts": [{"name": "certs", "mountPath": "/etc/ssl/extra", "readOnly": True}],
    "modelCache": {"existingClaim": "hf-cache"}})


def test_pod_defaults_reach_engines_and_routers() -> None:
    spec = _spec()
    pool, owner = _pool(spec, "decode")
    router = next(o for o in render.router_objects(spec, OWNER, defaults=DEFAULTS) if o["kind"] == "Deployment")
    for pod in (render_pool.pool_deployment(pool, owner, DEFAULTS)["spec"]["template"]["spec"],
                router["spec"]["template"]["spec"]):
        container = pod["containers"][0]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["priorityClassName"] == "llm-serving"
        assert {"name": "certs", "secret": {"secretName": "ca"}} in pod["volumes"]
        assert {"name": "certs", "mountPath": "/etc/ssl/extra", "readOnly": True} in container["volumeMounts"]
        # The model-weight cache: vLLM downloads weights into it and the router its tokenizer.
        assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod["volumes"]
        assert {"name": "model-cache", "mountPath": HF_CACHE_PATH} in container["volumeMounts"]
        assert {"name": "HF_HOME", "value": HF_CACHE_PATH} in container["env"]
    # Without defaults a pod has none of it.
    bare = render_pool.pool_deployment(pool, owner)["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in bare and "priorityClassName" not in bare
    assert all(v["name"] != "model-cache" for v in bare["volumes"])


def test_simulator_pods_get_pull_secrets_but_no_weight_cache() -> None:
    spec = _spec(engine={"type": "simulator"}, prefill={"gpus": 0}, decode={"gpus": 0})
    host = PodDefaults.parse({"imagePullSecrets": ["regcred"], "modelCache": {"hostPath": "/mnt/hf"}})
    assert host.model_cache == {"hostPath": {"path": "/mnt/hf", "type": "DirectoryOrCreate"}}
    pool, owner = _pool(spec, "decode")
    router = next(o for o in render.router_objects(spec, OWNER, defaults=host) if o["kind"] == "Deployment")
    for pod in (render_pool.pool_deployment(pool, owner, host)["spec"]["template"]["spec"],
                router["spec"]["template"]["spec"]):
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert all(v["name"] != "model-cache" for v in pod.get("volumes", []))
        assert all(e["name"] != "HF_HOME" for e in pod["containers"][0]["env"])
    assert "resources" not in render_pool.pool_deployment(pool, owner)["spec"]["template"]["spec"]["containers"][0]


def test_default_vllm_image_is_the_vllm_the_tests_run() -> None:
    script = (Path(__file__).parents[3] / "scripts" / "vllm-cpu-env.sh").read_text()
    tested = re.search(r"^VLLM_VERSION=(\S+)$", script, re.M)
    assert tested is not None
    image = render_pool.DEFAULT_VLLM_IMAGE
    assert image == f"vllm/vllm-openai:v{tested.group(1)}"


def test_aggregated_vllm_over_redis_shares_the_store_and_tells_the_router() -> None:
    spec = _spec(mode="aggregated", prefill=None, kvTransfer={"backend": "redis", "redisURL": "redis://kv:6379/0"})
    pool, _ = _pool(spec, "aggregated")
    _, args = render_pool.engine_command(pool)
    kv = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "KvpilotRedisConnector" and kv["kv_connector_extra_config"]["redis_url"] == \
        "redis://kv:6379/0"
    model = RouterConfig.model_validate(render.router_config(spec, OWNER)).models[0]
    assert model.shared_store()  # the router warms pods from the store on scale events
    # NIXL or no kvTransfer: aggregated pools run no connector and the router exports nothing.
    for other in (_spec(mode="aggregated", prefill=None), _spec(mode="aggregated", prefill=None,
                                                                  kvTransfer={"backend": "nixl"})):
        plain, _ = _pool(other, "aggregated")
        assert "--kv-transfer-config" not in render_pool.engine_command(plain)[1]
        assert not RouterConfig.model_validate(render.router_config(other, OWNER)).models[0].shared_store()
    # Simulator engines keep their export/import handover, whatever the backend.
    sim = _spec(engine={"type": "simulator"}, kvTransfer={"backend": "redis", "redisURL": "redis://kv:6379/0"})
    assert not RouterConfig.model_validate(render.router_config(sim, OWNER)).models[0].shared_store()


def test_the_operators_image_reaches_simulators_and_never_vllm_engines() -> None:
    """`helm upgrade --set image.tag=…` (or a registry mirror) changes the operator's --image: the
    simulator runs the kvpilot command, so it follows; a vLLM engine's image is the spec's alone."""
    sim, owner = _pool(_spec(engine={"type": "simulator"}), "decode")
    mirror = "mirror.example/kvpilot:next"

    def image(pool: WorkerPoolSpec, operator_image: str | None) -> str:
        image: str = render_pool.pool_deployment(pool, owner, image=operator_image)["spec"]["template"]["spec"][
            "containers"][0]["image"]
        return image

    assert image(sim, None) == render.kvpilot_image() and image(sim, mirror) == mirror
    vllm, owner = _pool(_spec(), "decode")
    assert render_pool.pool_deployment(vllm, owner, image=mirror) == render_pool.pool_deployment(vllm, owner)
    assert image(vllm, mirror) == render_pool.DEFAULT_VLLM_IMAGE
