"""The CRDs generated from kvpilot.crds: committed files current, structural, and the same rules as pydantic."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kvpilot.crds import LLMService, LLMServiceSpec, PoolSpec
from kvpilot.generated import stale
from kvpilot.operator import crdgen

ROOT = Path(__file__).resolve().parents[3]


def _crd(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "crds" / name).read_text())
    return doc


def test_committed_crds_match_the_models() -> None:
    old = stale(crdgen.generated(), crdgen.REPO_ROOT)
    assert not old, f"run `python -P -m kvpilot.operator.crdgen`: stale {old}"
    assert (ROOT / "deploy/crds/llmservices.yaml").read_text() == \
        (ROOT / "helm/kvpilot/crds/llmservices.yaml").read_text()


def test_schemas_are_structural() -> None:
    for name in ("llmservices.yaml", "workerpools.yaml"):
        text = json.dumps(_crd(name))
        for construct in ('"$ref"', '"anyOf"', '"oneOf"', '"null"', '"title"', '"additionalProperties": true'):
            assert construct not in text, f"{construct} in {name}"


def test_llmservice_names_columns_and_rules() -> None:
    crd = _crd("llmservices.yaml")
    assert crd["spec"]["names"]["shortNames"] == ["llmsvc"]
    version = crd["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and "Ready" in columns
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["model"]
    assert spec["properties"]["engine"]["properties"]["type"]["enum"] == ["vllm", "simulator", "ray-serve"]
    decode = spec["properties"]["decode"]
    assert decode["properties"]["replicas"]["minimum"] == 0
    assert any("minReplicas <= self.maxReplicas" in r["rule"] for r in decode["x-kubernetes-validations"])
    attainment = spec["properties"]["slo"]["properties"]["attainment"]
    assert attainment["exclusiveMinimum"] is True and attainment["minimum"] == 0


def test_workerpool_scale_subresource() -> None:
    version = _crd("workerpools.yaml")["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:4] == ["Service", "Role", "Desired", "Ready"]


@pytest.mark.parametrize("pool, message", [
    ({"minReplicas": 3, "maxReplicas": 2, "replicas": 2}, "minReplicas must be less than or equal to maxReplicas"),
    ({"minReplicas": 2, "replicas": 1}, "replicas must be greater than or equal to minReplicas"),
    ({"maxReplicas": 2, "replicas": 3}, "replicas must be less than or equal to maxReplicas"),
    ({"gpus": 3, "tensorParallel": 2}, "gpus must be a multiple of tensorParallel"),
    ({"gpus": 8, "tensorParallel": 8, "pipelineParallel": 2}, "gpus must be a multiple of tensorParallel × "
                                                               "pipelineParallel"),
])
def test_pydantic_enforces_the_cel_rules(pool: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PoolSpec.model_validate(pool)
    rules = [r["message"] for r in _crd("llmservices.yaml")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
             ["properties"]["spec"]["properties"]["decode"]["x-kubernetes-validations"]]
    assert message in rules


def test_aggregated_service_rejects_a_prefill_pool() -> None:
    with pytest.raises(ValidationError, match="prefill is only used in disaggregated mode"):
        LLMServiceSpec.model_validate({"model": {"name": "m"}, "mode": "aggregated", "prefill": {}})


@pytest.mark.parametrize("path", sorted((ROOT / "deploy" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    svc = LLMService.model_validate(yaml.safe_load(path.read_text()))
    assert svc.spec.pools()


def test_chart_version_is_the_package_version() -> None:
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((ROOT / "helm" / "kvpilot" / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == package


def test_status_has_one_shape_that_prunes_handler_results() -> None:
    """Why status is not kopf's handler results: kopf would write each handler's return value under
    `status.<handler id>`; the printer columns (and the autoscaler, dashboards) read fixed top-level
    fields, and the structural status schema prunes any key it does not name."""
    import kopf

    import kvpilot.operator.handlers  # noqa: F401  (registers the handlers)

    version = _crd("llmservices.yaml")["spec"]["versions"][0]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status
    read = {c["jsonPath"].split(".")[2].split("[")[0] for c in version["additionalPrinterColumns"]
            if c["jsonPath"].startswith(".status.")}
    assert read and read <= set(status["properties"])
    ids = {h.id.split("/")[0] for h in kopf.get_default_registry()._changing._handlers}
    assert "llmservice-update" in ids and not ids & set(status["properties"])
