"""Scale events end to end, through the path the local autoscaler takes (`LocalActuator.scale`):
real `kvpilot sim serve` workers, the real router, a real private Redis. A retired worker's hot
prefix reaches the pod that inherits its ring key before the worker stops; a new worker is
pre-warmed with the hot prefixes it now owns before it is published; with the store down, the
handover fails, is counted, and clients see nothing of it."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from kvpilot.autoscaler.actuators import PoolRef
from kvpilot.local import LocalActuator, LocalControlPlane, load_service
from kvpilot.procs import wait_for
from kvpilot.router.hashring import dual_ring_owners
from kvpilot.tokens import block_hashes, block_text

# The router's hashing granularity. DualMap keys a prefix that is not hot (fewer than its share of
# the first hundred requests, as every prompt here) by its first block.
ROUTER_BLOCK = 256
POOL = PoolRef("local", "sc", "aggregated", "sc-aggregated")


def _plane(tmp_path: Path, replicas: int) -> LocalControlPlane:
    spec = tmp_path / "svc.yaml"
    spec.write_text(f"""
apiVersion: kvpilot.io/v1alpha1
kind: LLMService
metadata: {{name: sc}}
spec:
  model: {{name: tiny, servedName: tiny}}
  engine: {{type: simulator, profile: h100-qwen2.5-0.5b}}
  mode: aggregated
  decode: {{replicas: {replicas}}}
  routing: {{policy: dualmap}}
""")
    return LocalControlPlane(load_service(spec), workdir=tmp_path / "plane", time_scale=5, autoscale=False)


def _complete(url: str, prompt: str) -> tuple[str, int]:
    """(endpoint that served it, cached prompt tokens) for one completion."""
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return resp.headers.get("X-Kvpilot-Endpoint", ""), int(out["usage"]["prompt_tokens_details"]["cached_tokens"])


def _handovers(url: str, kind: str, outcome: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(rf'kvpilot_router_handovers_total{{[^}}]*kind="{kind}",[^}}]*outcome="{outcome}"}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _prompt_owned_by(pod: str, members: frozenset[str]) -> tuple[str, int]:
    """A 1024-token prompt whose DualMap key has `pod` as first candidate, and that key."""
    owners = dual_ring_owners()
    for seed in range(500):
        prompt = block_text(seed, 1024)
        key = block_hashes(prompt, ROUTER_BLOCK)[0]
        if owners(key, members)[0] == pod:
            return prompt, key
    raise AssertionError(f"no prompt keyed to {pod}")


def _warm(url: str, prompt: str, pod: str) -> None:
    """Make `prompt` hot on `pod`: the router sends it there every time and it hits from the second."""
    served = [_complete(url, prompt) for _ in range(3)]
    assert [s for s, _ in served] == [pod] * 3
    assert served[0][1] == 0 and served[-1][1] == 1008  # 64 blocks of 16 tokens, less the last token


def test_retired_workers_hot_prefix_is_a_hit_on_its_successor_and_a_new_worker_is_prewarmed(tmp_path: Path) -> None:
    with _plane(tmp_path, 3) as plane:
        assert plane.kv_store is not None  # a private Redis for scale events
        before = frozenset(plane.workers)
        newest = "sc-aggregated-3"  # the worker retired first
        prompt, key = _prompt_owned_by(newest, before)
        _warm(plane.url, prompt, newest)

        LocalActuator(plane).scale(POOL, 2)
        wait_for(lambda: newest not in plane.pool, 30, "the retired worker to stop")
        assert _handovers(plane.url, "scale_in", "ok") == 1
        owners = dual_ring_owners()
        heirs = set(owners(key, before - {newest})) - set(owners(key, before))
        served, cached = _complete(plane.url, prompt)
        assert served in heirs and cached == 1008  # the first request after scale-in hits

        # Scale out: the new worker owns the prompt's key on one ring and gets it before it serves.
        joining = "sc-aggregated-4"
        members = frozenset(plane.workers)
        texts = (block_text(s, 1024) for s in range(1000, 1500))
        prompt2, key2 = next((p, k) for p, k in ((t, block_hashes(t, ROUTER_BLOCK)[0]) for t in texts)
                             if joining in owners(k, members | {joining}))
        first = owners(key2, members)[0]
        _warm(plane.url, prompt2, first)
        LocalActuator(plane).scale(POOL, 3)
        wait_for(lambda: joining in plane.workers, 30, "the new worker to be published")
        assert _handovers(plane.url, "scale_out", "ok") == 1
        assert _complete(plane.workers[joining], prompt2) == ("", 1008)  # warm before its first request


def test_handover_with_the_store_down_fails_soft_and_is_counted(tmp_path: Path) -> None:
    with _plane(tmp_path, 3) as plane:
        before = frozenset(plane.workers)
        newest = "sc-aggregated-3"
        prompt, _ = _prompt_owned_by(newest, before)
        _warm(plane.url, prompt, newest)
        next(p for p in plane.procs if p.name == "redis").stop()

        LocalActuator(plane).scale(POOL, 2)
        wait_for(lambda: _handovers(plane.url, "scale_in", "failed") == 1, 30, "the failed handover to be counted")
        assert _handovers(plane.url, "scale_in", "ok") == 0
        wait_for(lambda: newest not in plane.pool, 30, "the retired worker to stop")
        served, cached = _complete(plane.url, prompt)  # still served: recomputed on a remaining worker
        assert served in before - {newest} and cached == 0
