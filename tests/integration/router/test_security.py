"""API keys, per-key limits and the admin listener, on a real router in front of one simulator:
no key or a wrong key → 401, a revoked key → 401 once the file is re-read, over a key's limit →
429 with Retry-After; admin endpoints answer only on the admin port, only with its token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from kvpilot.procs import wait_for
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker

FAST = ("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5")
BODY = {"model": "sim-model", "prompt": "hello there", "max_tokens": 2}


def _call(url: str, body: dict[str, Any] | None = None, token: str | None = None) -> tuple[int, dict[str, Any], Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
            return resp.status, (json.loads(text) if resp.headers.get_content_type() == "application/json" else {}), \
                resp.headers
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, (json.loads(text) if e.headers.get_content_type() == "application/json" else {}), e.headers


@pytest.fixture
def secured(sim_worker_factory: Callable[..., SimWorker], router_factory: Callable[..., RouterProcess],
            tmp_path: Path) -> tuple[RouterProcess, Path]:
    worker = sim_worker_factory(*FAST)
    keys = tmp_path / "keys.yaml"
    keys.write_text(json.dumps({"keys": [
        {"name": "open", "key": "sk-open-0001"},
        # One request, then a token every 1000 s: the second is over the limit on any machine.
        {"name": "metered", "key": "sk-metered-01", "requestsPerSecond": 0.001, "burst": 1}]}))
    token = tmp_path / "admin-token"
    token.write_text("admin-secret-1\n")
    router = router_factory([{"name": "sim-model", "endpoints": [{"name": "w0", "url": worker.url}]}],
                           apiKeysFile=str(keys), apiKeysReloadSeconds=0.2, adminTokenFile=str(token))
    return router, keys


def test_keys_are_required_limited_and_revocable(secured: tuple[RouterProcess, Path]) -> None:
    router, keys = secured
    status, body, _ = _call(router.url + "/v1/completions", BODY)
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "API key" in body["error"]["message"]
    assert _call(router.url + "/v1/completions", BODY, "sk-wrong-0001")[0] == 401
    assert _call(router.url + "/v1/models", token=None)[0] == 401
    assert _call(router.url + "/health")[0] == 200            # probes and scrapes need no key
    assert _call(router.url + "/metrics")[0] == 200

    client = openai.OpenAI(base_url=router.url + "/v1", api_key="sk-open-0001", max_retries=0, timeout=30)
    assert client.completions.create(model="sim-model", prompt="hello there", max_tokens=2).choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=router.url + "/v1", api_key="sk-nope-0001", max_retries=0).models.list()

    assert _call(router.url + "/v1/completions", BODY, "sk-metered-01")[0] == 200
    status, body, headers = _call(router.url + "/v1/completions", BODY, "sk-metered-01")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and int(headers["Retry-After"]) >= 1
    assert _call(router.url + "/v1/completions", BODY, "sk-open-0001")[0] == 200   # limits are per key

    keys.write_text(json.dumps([{"name": "metered", "key": "sk-metered-01"}]))    # "open" revoked
    wait_for(lambda: _call(router.url + "/v1/completions", BODY, "sk-open-0001")[0] == 401, 15,
             "the revoked key to be refused")
    assert "sk-open-0001" not in router.proc.log_path.read_text()


def test_admin_endpoints_only_on_the_admin_port_with_its_token(secured: tuple[RouterProcess, Path]) -> None:
    router, _ = secured
    for path, body in (("/kvpilot/migrate", {"request_id": "x"}), ("/kvpilot/handover", {"model": "sim-model"}),
                       ("/debug/kv-match", {"model": "sim-model", "prompt": "x"}), ("/dashboard", None),
                       ("/dashboard/data", None)):
        assert _call(router.url + path, body, "sk-open-0001")[0] == 404, path
    assert _call(router.admin_url + "/dashboard/data")[0] == 401
    assert _call(router.admin_url + "/dashboard/data", token="sk-open-0001")[0] == 401   # a client key is not enough
    status, data, _ = _call(router.admin_url + "/dashboard/data", token="admin-secret-1")
    assert status == 200 and data["models"][0]["name"] == "sim-model"
    status, data, _ = _call(router.admin_url + "/kvpilot/migrate", {"request_id": "none"}, "admin-secret-1")
    assert status == 404 and data["outcome"] == "not_found"   # the migrator answered: no such stream
