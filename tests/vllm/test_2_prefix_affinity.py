"""Prefix affinity against the engine's own counter: repeated prefixes hit the chosen instance's cache."""

from __future__ import annotations

from collections.abc import Callable

from vllm_stage import Stage, make_prompt, post_json, router_model

from kvpilot.testing.router import RouterProcess
from kvpilot.testing.vllm import BLOCK_SIZE


def test_repeated_prefix_raises_prefix_cache_hits_on_the_chosen_instance(
        pair: Stage, router_factory: Callable[..., RouterProcess]) -> None:
    router = router_factory([router_model(pair)])
    shared = make_prompt("affinity", 5 * BLOCK_SIZE + 20)   # five full engine blocks
    hits = {n: s.metric("vllm:prefix_cache_hits_total") for n, s in pair.servers.items()}
    chosen = []
    for i in range(4):
        body = {"model": "tiny", "prompt": f"{shared} question {i}", "max_tokens": 2}
        _, headers = post_json(router.url + "/v1/completions", body)
        chosen.append(headers["X-Kvpilot-Endpoint"])
    assert len(set(chosen)) == 1, chosen
    home = chosen[0]
    gained = {n: s.metric("vllm:prefix_cache_hits_total") - hits[n] for n, s in pair.servers.items()}
    # Requests 2-4 find the five shared blocks in the home instance's cache; the other sees nothing.
    assert gained[home] >= 3 * 5 * BLOCK_SIZE, gained
    assert all(v == 0 for n, v in gained.items() if n != home), gained
