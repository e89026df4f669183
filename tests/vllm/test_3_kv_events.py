"""The router's cache view from real vLLM KV events over ZMQ, checked against what the engine reports.

The router keys blocks by their token ids (`kvpilot.router.kv_events`); the engine says how many
prompt tokens it found cached (`usage.prompt_tokens_details.cached_tokens`). They must agree before
and after eviction (BlockRemoved), on both instances.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm_stage import Stage, kv_match, make_prompt, post_json, router_model

from kvpilot.procs import wait_for
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.vllm import BLOCK_SIZE

CAPACITY_BLOCKS = 16  # --num-gpu-blocks-override in the stage


def _engine_cached(stage: Stage, name: str, prompt: str) -> int:
    usage = stage.servers[name].post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1})["usage"]
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def test_cache_view_from_kv_events_agrees_with_the_engine(pair: Stage,
                                                           router_factory: Callable[..., RouterProcess]) -> None:
    router = router_factory([router_model(pair)])
    base = make_prompt("kv-events", 4 * BLOCK_SIZE + 30)           # four full blocks
    _, headers = post_json(router.url + "/v1/completions", {"model": "tiny", "prompt": base, "max_tokens": 1})
    home = headers["X-Kvpilot-Endpoint"]
    other = next(n for n in pair.servers if n != home)
    wait_for(lambda: kv_match(router.admin_url, base)["cached_tokens"].get(home, 0) >= 4 * BLOCK_SIZE, 15,
             "BlockStored events for the prompt to reach the router")

    # A longer prompt sharing the four blocks: the router's prediction is the engine's count, per instance.
    longer = base + " " + make_prompt("kv-events-tail", 2 * BLOCK_SIZE)
    predicted = kv_match(router.admin_url, longer)["cached_tokens"]
    assert predicted.get(home) == 4 * BLOCK_SIZE and predicted.get(other, 0) == 0, predicted
    assert _engine_cached(pair, home, longer) == predicted[home]
    assert _engine_cached(pair, other, longer) == predicted.get(other, 0)

    # The policy uses the observed view: a third prompt on the same prefix goes where the blocks are.
    third = base + " " + make_prompt("kv-events-third", 50)
    seen = kv_match(router.admin_url, third)["cached_tokens"]
    _, headers = post_json(router.url + "/v1/completions", {"model": "tiny", "prompt": third, "max_tokens": 1})
    assert seen[headers["X-Kvpilot-Endpoint"]] == max(seen.values())

    # Fill the home instance's 16 blocks with other prompts: BlockRemoved must take the prefix out.
    for i in range(5):
        pair.servers[home].post("/v1/completions", {"model": "tiny", "max_tokens": 1,
                                                    "prompt": make_prompt(f"evict-{i}", 5 * BLOCK_SIZE + 10)})
    wait_for(lambda: kv_match(router.admin_url, base)["cached_tokens"][home] < 4 * BLOCK_SIZE, 15,
             "BlockRemoved events to reach the router")
    state = kv_match(router.admin_url, base)
    assert state["blocks"][home] <= CAPACITY_BLOCKS, state
    assert _engine_cached(pair, home, base) == state["cached_tokens"][home]


def _engine_cached_chat(stage: Stage, name: str, messages: list[dict[str, str]]) -> int:
    usage = stage.servers[name].post("/v1/chat/completions",
                                     {"model": "tiny", "messages": messages, "max_tokens": 1})["usage"]
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def test_chat_requests_are_keyed_through_the_models_chat_template(pair: Stage,
                                                                  router_factory: Callable[..., RouterProcess]) -> None:
    """The engine builds a chat's prompt with the model's template; the router renders the same
    template, so a chat's cached prefix is seen in the events too."""
    router = router_factory([router_model(pair)])
    system = {"role": "system", "content": make_prompt("chat-system", 3 * BLOCK_SIZE + 20)}
    first = [system, {"role": "user", "content": "hello"}]
    _, headers = post_json(router.url + "/v1/chat/completions", {"model": "tiny", "messages": first, "max_tokens": 1})
    home = headers["X-Kvpilot-Endpoint"]
    other = next(n for n in pair.servers if n != home)
    wait_for(lambda: kv_match(router.admin_url, messages=first)["cached_tokens"].get(home, 0) >= 3 * BLOCK_SIZE, 15,
             "BlockStored events for the chat to reach the router")
    # Another question after the same system prompt: the shared blocks, as the engine counts them.
    second = [system, {"role": "user", "content": make_prompt("chat-question", 60)}]
    predicted = kv_match(router.admin_url, messages=second)["cached_tokens"]
    assert predicted.get(home) == 3 * BLOCK_SIZE and predicted.get(other, 0) == 0, predicted
    assert _engine_cached_chat(pair, home, second) == predicted[home]
    assert _engine_cached_chat(pair, other, second) == predicted.get(other, 0)


def test_a_router_started_after_the_engines_replays_what_it_missed(
        pair: Stage, router_factory: Callable[..., RouterProcess]) -> None:
    """The engines keep recent KV-event batches on their replay sockets (rendered by the operator).
    A router that (re)starts later sees their sequence jump and fetches the batches it missed,
    so prefixes cached before it started are in its view, as the engines count them."""
    first = router_factory([router_model(pair)])
    base = make_prompt("kv-replay", 3 * BLOCK_SIZE + 20)
    _, headers = post_json(first.url + "/v1/completions", {"model": "tiny", "prompt": base, "max_tokens": 1})
    home = headers["X-Kvpilot-Endpoint"]
    wait_for(lambda: kv_match(first.admin_url, base)["cached_tokens"].get(home, 0) >= 3 * BLOCK_SIZE, 15,
             "the first router to see the prefix")
    first.stop()

    second = router_factory([router_model(pair)])   # binds the same KV-event port; the engines reconnect
    assert kv_match(second.admin_url, base)["cached_tokens"].get(home, 0) == 0, "nothing seen yet"
    # Any new batch from the instance shows the second router that it missed the earlier ones.
    pair.servers[home].post("/v1/completions", {"model": "tiny", "max_tokens": 1,
                                                "prompt": make_prompt("kv-replay-poke", 2 * BLOCK_SIZE)})
    wait_for(lambda: kv_match(second.admin_url, base)["cached_tokens"].get(home, 0) >= 3 * BLOCK_SIZE, 20,
             "the second router to replay the missed batches")
    assert kv_match(second.admin_url, base)["cached_tokens"][home] == _engine_cached(pair, home, base)
    replayed = f'kvpilot_router_kv_event_replays_total{{endpoint="{home}",model="tiny",outcome="ok"}}'
    assert replayed in second.metrics_text()
