"""vLLM accepts and applies exactly the args the operator renders for the `vllm` engine type.

Every instance of the tier is started from `render_pool.pool_deployment` output (vllm_stage.py). Here
we check that what ran is that output, changed only where a pod's own IP and cluster DNS would
differ on loopback, and that vLLM applied the settings (prefix caching, cache size, served name).
"""

from __future__ import annotations

import json
import urllib.request

from vllm_stage import Stage

from kvpilot.testing.vllm import metric


def _only_localized(rendered: list[str], ran: list[str]) -> set[str]:
    """Flags whose values differ between the rendered args and those that ran."""
    assert len(rendered) == len(ran)
    return {rendered[i - 1] for i, (a, b) in enumerate(zip(rendered, ran, strict=True)) if a != b}


def test_pair_runs_the_rendered_aggregated_args(pair: Stage) -> None:
    for pod, server in pair.servers.items():
        container = pair.deployments[pod]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["vllm", "serve"]
        assert _only_localized(container["args"], server.args) <= {"--host", "--port", "--kv-events-config"}
        events = json.loads(server.args[server.args.index("--kv-events-config") + 1])
        assert events["topic"] == pod and events["enable_kv_cache_events"] is True
        assert "--kv-transfer-config" not in server.args     # aggregated: no connector
        text = server.metrics_text()
        assert metric(text, "vllm:cache_config_info", enable_prefix_caching="True", num_gpu_blocks="16") == 1
        with urllib.request.urlopen(server.url + "/v1/models", timeout=5) as resp:
            assert [m["id"] for m in json.loads(resp.read())["data"]] == ["tiny"]


def test_pd_runs_the_rendered_nixl_args(pd: Stage) -> None:
    roles = {"tiny-prefill-a": "kv_producer", "tiny-decode-a": "kv_consumer"}
    for pod, server in pd.servers.items():
        container = pd.deployments[pod]["spec"]["template"]["spec"]["containers"][0]
        assert _only_localized(container["args"], server.args) <= {"--host", "--port", "--kv-events-config"}
        kv = json.loads(server.args[server.args.index("--kv-transfer-config") + 1])
        assert kv == {"kv_connector": "NixlConnector", "kv_role": roles[pod], "kv_buffer_device": "cpu"}
        assert server.healthy()
