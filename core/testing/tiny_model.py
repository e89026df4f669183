"""Build a tiny random Llama and a BPE tokenizer trained on local text, fully offline (seconds).

Real vLLM needs a real Hugging Face model directory; the weights' values do not matter to the
engine's scheduling, caching and transfer behaviour, only the shapes do. So tests make their own
model instead of downloading one: 820 k parameters, head_dim 32 (a size the CPU attention backend
supports), a byte-level BPE of 4096 tokens trained on the Python standard library's sources.

Run with the vLLM venv's interpreter (it needs torch, transformers and tokenizers, which the
kvpilot venv does not have): `python -P tiny_model.py OUT_DIR`. Hence no kvpilot imports here.
`kvpilot.testing.vllm.tiny_model()` calls it and caches the result.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build(out: str, vocab_size: int = 4096, seed: int = 0) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:150]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=SPECIAL[4:], model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3, tie_word_embeddings=True, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)


if __name__ == "__main__":
    build(sys.argv[1])
