"""The `serveConfigV2` the operator renders for the `ray-serve` simulator example, deployed on a local
Ray (2 CPUs, loopback) the way KubeRay deploys it: as a declarative Serve config through the Serve
controller. It builds `kvpilot.ray.app:from_args`, puts kvpilot's router on the SimEngine deployment
through the config's override, and serves OpenAI completions whose shared prefixes stay on one replica.
Only `http_options` is replaced: KubeRay's pods listen on 0.0.0.0:8000, the test on a free loopback port.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from kvpilot.crds import LLMService
from kvpilot.operator import render_ray
from kvpilot.procs import free_port, wait_for
from kvpilot.ray.local import LocalRay
from kvpilot.testing.k8s import REPO_ROOT

pytestmark = pytest.mark.timeout(600)   # Ray plus 5 replica processes: about a minute quiet, 3 loaded
EXAMPLE = REPO_ROOT / "deploy" / "examples" / "ray-serve-simulator.yaml"
PREFIXES = [f"team {p} system prompt. " + "Answer briefly about KV caches. " * 24 for p in range(6)]


@pytest.fixture(scope="module")
def deployed() -> Iterator[tuple[int, str]]:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"].update(namespace="ns", uid="u")
    rendered = render_ray.rayservice(LLMService.model_validate(body).spec, body)
    config = yaml.safe_load(rendered["spec"]["serveConfigV2"])
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    local = LocalRay(num_cpus=2)
    left: list[int] = []
    try:
        local.start(http_port=port)
        client = serve.context._get_global_client()
        client.deploy_apps(ServeDeploySchema.model_validate(config))

        def running() -> bool:
            return serve.status().applications[render_ray.APP_NAME].status == "RUNNING"

        wait_for(running, 400, "the rendered Serve app RUNNING")
        yield port, config["applications"][0]["args"]["model"]
    finally:
        left = local.stop()
    assert not left, f"Ray processes survived ray.shutdown(): {left}"


def test_rendered_config_serves_with_kvpilots_router(deployed: tuple[int, str]) -> None:
    port, model = deployed
    status = serve.status().applications[render_ray.APP_NAME]
    assert set(status.deployments) == {"Ingress", render_ray.SIM_ENGINE_DEPLOYMENT}
    details = serve.context._get_global_client().get_serve_details()
    engine = details["applications"][render_ray.APP_NAME]["deployments"][render_ray.SIM_ENGINE_DEPLOYMENT]
    router = engine["deployment_config"]["request_router_config"]
    assert router["request_router_class"] == render_ray.ROUTER_CLASS   # the config's override took effect
    assert len(engine["replicas"]) == 4   # the example's decode.replicas

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    served: dict[int, set[str]] = {}
    for question in range(2):
        for p, prefix in enumerate(PREFIXES):
            last = None
            for chunk in client.completions.create(model=model, prompt=prefix + f"Q{question}?", max_tokens=4,
                                                   stream=True):
                last = chunk
            assert last is not None
            served.setdefault(p, set()).add((last.model_extra or {})["kvpilot"]["replica"])
    assert all(len(replicas) == 1 for replicas in served.values()), served   # DualMap keeps each prefix home
    assert len(set().union(*served.values())) > 1, "every prefix on one replica: nothing was balanced"
