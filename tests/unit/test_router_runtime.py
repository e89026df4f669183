"""The router's runtime built from config: what a request becomes before its policy sees it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from kvpilot.router.config import RouterConfig
from kvpilot.router.runtime import OFFLOAD_CHARS, Runtime
from kvpilot.tokens import block_hashes, block_text, token_count


def tokenizer_dir(tmp_path: Path) -> Path:
    """A small byte-level BPE tokenizer with a chat template, as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((block_text(k, 64) for k in range(20)), trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return tmp_path


def runtime(tmp_path: Path, kv_events: bool) -> Runtime:
    model: dict[str, object] = {"name": "m", "policy": "dualmap", "blockSize": 64,
                                "endpoints": [{"name": "w0", "url": "http://127.0.0.1:9"}]}
    if kv_events:
        model["kvEvents"] = {"bind": "tcp://127.0.0.1:0", "tokenizer": str(tokenizer_dir(tmp_path)), "blockSize": 16}
    return Runtime(RouterConfig.model_validate({"models": [model]}))


def test_a_request_view_hashes_the_prompt_as_the_engines_do(tmp_path: Path) -> None:
    model = runtime(tmp_path, kv_events=False).models["m"]
    prompt = block_text(3, 1000)
    view = model.request_view("r", prompt)
    assert view.prompt_tokens == token_count(prompt) == 1000
    assert view.block_hashes == block_hashes(prompt, 64) and len(view.block_hashes) == 15
    asyncio.run(model.engine_keys(view, prompt))
    assert view.engine_blocks == (), "no KV events: no engine keys"


def test_engine_keys_are_the_same_inline_and_off_the_event_loop(tmp_path: Path) -> None:
    model = runtime(tmp_path, kv_events=True).models["m"]
    index = model.kv_index
    assert index is not None and index.tokenizer is not None
    short, long = block_text(1, 40), block_text(2, 4000)
    assert len(short) < OFFLOAD_CHARS < len(long)   # tokenized inline, and in a worker thread
    for prompt in (short, long):
        view = model.request_view("r", prompt)
        asyncio.run(model.engine_keys(view, prompt))
        assert view.engine_blocks == index.prompt_keys(prompt) and view.engine_blocks
        messages = [{"role": "user", "content": prompt}]
        asyncio.run(model.engine_keys(view, prompt, messages))
        assert view.engine_blocks == index.chat_keys(messages) and view.engine_blocks


def test_pool_role_labels_name_the_decode_pool_decode_in_every_metric() -> None:
    """In P/D the router's main pool is the decode pool: its healthy-endpoint count says "decode",
    as its queue depth and the autoscaler's reads do (it said "main" here alone)."""
    from kvpilot.router.admin import Admin

    pd = {"name": "m", "policy": "dualmap", "mode": "disaggregated",
          "endpoints": [{"name": "p0", "url": "http://127.0.0.1:9", "role": "prefill"},
                        {"name": "d0", "url": "http://127.0.0.1:10", "role": "decode"}]}
    rt = Runtime(RouterConfig.model_validate({"models": [pd]}))
    text = asyncio.run(Admin(rt).metrics(None)).text or ""
    healthy = {line.split("{", 1)[1].split("}", 1)[0] for line in text.splitlines()
               if line.startswith("kvpilot_router_healthy_endpoints{")}
    assert healthy == {'model="m",role="prefill"', 'model="m",role="decode"'}, healthy
