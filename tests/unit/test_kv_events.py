"""The router's KV-event index: vLLM's BlockStored/BlockRemoved batches in, leading-hit counts out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpilot.router.kv_events import BlockIndex, KVEventIndex, load_chat_template, token_block_keys
from kvpilot.router.policy import RequestView

BS = 4


def _stored(hashes: list[int], parent: int | None, tokens: list[int]) -> dict[str, object]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": BS, "lora_id": None, "medium": "GPU"}


def _view(tokens: list[int]) -> RequestView:
    return RequestView("r", len(tokens), [], engine_blocks=tuple(token_block_keys(tokens, BS)))


def test_stored_chains_across_batches_and_removed_cuts_the_prefix() -> None:
    index = KVEventIndex(BS)
    prompt = list(range(100, 114))                       # 3 full blocks + 2 tokens
    index.apply("a", 0, [0.0, [_stored([11, 12], None, prompt[:8])], 0])
    index.apply("a", 1, [0.1, [_stored([13], 12, prompt[8:12])], 0])   # parent from the earlier batch
    assert index.cached_tokens("a", _view(prompt)) == 12
    assert index.cached_tokens("b", _view(prompt)) == 0
    assert index.cached_tokens("a", _view([1, 2, 3, 4, *prompt])) == 0   # same blocks, different prefix
    # vLLM evicts a request's blocks tail first: the last block goes, the hit shrinks to the first two.
    index.apply("a", 2, [0.2, [{"type": "BlockRemoved", "block_hashes": [13], "medium": "GPU"}], 0])
    assert index.cached_tokens("a", _view(prompt)) == 8
    index.apply("a", 3, [0.2, [{"type": "BlockRemoved", "block_hashes": [12], "medium": "GPU"}], 0])
    assert index.cached_tokens("a", _view(prompt)) == 4  # a hit stops at the first missing block
    index.apply("a", 4, [0.3, [{"type": "AllBlocksCleared"}], 0])
    assert index.cached_tokens("a", _view(prompt)) == 0 and index.summary() == {"a": 0}


def test_unknown_parent_is_ignored_and_a_restart_clears() -> None:
    index = KVEventIndex(BS)
    index.apply("a", 5, [0.0, [_stored([21], 999, [1, 2, 3, 4])], 0])    # parent never seen: lost events
    assert index.summary() == {"a": 0}
    index.apply("a", 6, [0.0, [_stored([1], None, [1, 2, 3, 4])], 0])
    assert index.summary() == {"a": 1}
    index.apply("a", 0, [0.0, [], 0])                                       # seq went back: engine restarted
    assert index.summary() == {"a": 0}


def test_tagged_array_events_are_read_too() -> None:
    index = KVEventIndex(BS)
    index.apply("a", 0, [0.0, [["BlockStored", [7], None, [5, 6, 7, 8], BS]], 0])
    assert index.cached_tokens("a", _view([5, 6, 7, 8, 9])) == 4


def test_requests_without_engine_keys_defer_to_the_shadow_estimate() -> None:
    assert KVEventIndex(BS).cached_tokens("a", RequestView("r", 10, [1, 2])) is None


class _Encoding:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class _ByteTokenizer:
    """One token per byte; records whether special tokens were asked for."""

    def __init__(self) -> None:
        self.special: list[bool] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        self.special.append(add_special_tokens)
        return _Encoding(list(text.encode()))


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
            "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m.get('meta') %}{{ m['meta'] | tojson }}{% endif %}"
            "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_prompts_render_with_the_models_template_and_its_special_tokens(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>",
                                                                 "eos_token": "</s>"}))
    template = load_chat_template(str(tmp_path))
    assert template is not None
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"},
                                             {"type": "text", "text": "there"}], "meta": {"é": 1}}]
    # Jinja's own tojson would escape to \\u00e9 and HTML-quote; transformers' (and so vLLM's) does not.
    # trim_blocks, as transformers sets it, drops the newline right after each `{% endif %}`.
    assert template.render(messages) == '<s><|system|>be brief<|user|>hi\nthere{"é": 1}<|assistant|>'
    tok = _ByteTokenizer()
    index = KVEventIndex(BS, tok, template)
    keys = index.chat_keys(messages)
    assert keys == tuple(token_block_keys(list(template.render(messages).encode()), BS))
    assert tok.special == [False], "the template writes the special tokens; the tokenizer must not add more"
    assert index.chat_keys([{"role": "tool", "content": "x"}]) == (), "a template error means no view, not a crash"
    assert index.chat_keys("not a list") == ()


def test_a_model_without_a_chat_template_matches_no_chats(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(str(tmp_path)) is None
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    template = load_chat_template(str(tmp_path))   # the newer layout: the template in its own file
    assert template is not None and template.render([{"role": "user", "content": "a"}]) == "a"
    assert KVEventIndex(BS, _ByteTokenizer(), None).chat_keys([{"role": "user", "content": "a"}]) == ()


def test_missed_batches_are_replayed_before_the_live_ones_and_each_applies_once() -> None:
    """A router that starts after the engine sees seq 5 first: batches 0-4 hold the parents of what
    follows. It holds the live batches, replays from 0, then applies everything once, in order."""
    prompt = list(range(200, 220))   # 5 blocks
    batches = [(i, [0.0, [_stored([30 + i], 29 + i if i else None, prompt[i * BS:(i + 1) * BS])], 0])
               for i in range(5)]
    index = KVEventIndex(BS, replay_address=lambda name: "tcp://127.0.0.1:1" if name == "a" else None)
    assert index.receive("a", 3, batches[3][1]) == 0, "sequence starts mid-stream: replay from 0"
    assert index.receive("a", 4, batches[4][1]) is None and index.summary() == {}, "held while replaying"
    index.replayed("a", batches[:4], "ok")     # the replay overlaps the held live batch 3
    assert index.cached_tokens("a", _view(prompt)) == 5 * BS and index.replays == {"ok": 1}
    assert index.receive("a", 5, [0.0, [{"type": "BlockRemoved", "block_hashes": [34]}], 0]) is None
    assert index.cached_tokens("a", _view(prompt)) == 4 * BS, "live again after the replay"
    # An instance without a replay socket applies what it can: the orphaned block is dropped.
    assert index.receive("b", 2, batches[1][1]) is None and index.summary()["b"] == 0


def test_a_failed_replay_still_applies_the_held_batches() -> None:
    index = KVEventIndex(BS, replay_address=lambda name: "tcp://127.0.0.1:1")
    assert index.receive("a", 7, [0.0, [_stored([1], None, [1, 2, 3, 4])], 0]) == 0
    index.replayed("a", [], "timeout")
    assert index.summary() == {"a": 1} and index.replays == {"timeout": 1}
    assert index.receive("a", 8, [0.0, [], 0]) is None, "no replay while the sequence is contiguous"


def test_a_hub_model_gives_its_chat_template_from_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}x",
                                                                 "bos_token": "<s>"}))
    asked: list[tuple[str, str]] = []

    def download(repo: str, filename: str) -> str:   # the hub, served from a folder
        asked.append((repo, filename))
        if not (tmp_path / filename).is_file():
            raise EntryNotFoundError(filename)
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    template = load_chat_template("hf://org/model")
    assert template is not None and template.render([]) == "<s>x"
    assert asked == [("org/model", "tokenizer_config.json"), ("org/model", "chat_template.jinja")]


def test_a_router_whose_tokenizer_cannot_be_loaded_still_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub in reach (an air-gapped cluster): the router follows events but keys no prompts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # and nothing leaves loopback
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    from kvpilot.router.config import RouterConfig
    from kvpilot.router.runtime import Runtime

    cfg = RouterConfig.model_validate({"models": [{
        "name": "m", "policy": "dualmap", "endpoints": [{"name": "w0", "url": "http://127.0.0.1:9"}],
        "kvEvents": {"bind": "tcp://127.0.0.1:0", "tokenizer": "hf://kvpilot-test/not-cached-anywhere"}}]})
    index = Runtime(cfg).models["m"].kv_index
    assert index is not None and index.tokenizer is None and index.chat_template is None


def test_matching_a_long_prompt_agrees_with_a_scan_of_its_blocks() -> None:
    """Binary search over 2,000 blocks: the same leading hit as a block-by-block scan, whatever
    prefix of the prompt the instance holds."""
    import random

    rng = random.Random(5)
    tokens = [rng.randrange(50_000) for _ in range(2000 * BS)]
    keys = token_block_keys(tokens, BS)
    for held in (0, 1, 2, 999, 1000, 1999, 2000):
        index = BlockIndex()
        for k in keys[:held]:
            index.keys[k] += 1
        index.keys[rng.getrandbits(64)] += 1   # someone else's block
        assert index.match(keys) == held
