"""Hardware × model profiles: the numbers behind the simulator's step times and KV capacity.

A step's duration is additive over the work it does (vLLM runs prefill chunks and decodes of
one step as one forward pass):

    t = step_s                                   fixed cost: weights read, launch, sampling
      + prefill_token_s × new prompt tokens      linear layers, compute-bound
      + attn_pair_s × Σ new × (context + new/2)  causal attention over the context
      + decode_seq_s × decoding sequences        per-sequence overheads
      + decode_ctx_s × Σ decoding context        reading each decoding sequence's KV

The API server's per-request work (`request_overhead_s + frontend_token_s × prompt tokens`) is
outside the steps on a GPU host (its own CPU cores); a CPU engine pinned to one core shares that
core with it (`frontend_shares_core`), and the engine model then serializes the two.

A CPU engine (vLLM's oneDNN GEMMs) also builds its kernels per batched token count and keeps the
last ones built: a step of N tokens, a count it has not run recently, pays `new_shape_s +
new_shape_token_s × N` on top (an LRU of `shape_cache_size` distinct counts in the engine model).
0, off, in every GPU profile here.

Sources are stated per profile. "roofline" means derived from the GPU's datasheet peak (bf16
FLOP/s, HBM bandwidth) and the model's shape at a stated efficiency, then sanity-checked against
published vLLM figures (cited per profile); "measured" means fitted from our own runs of real vLLM
(`kvpilot sim calibrate`, the real-vLLM issue). No profile here is measured on a GPU yet.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class Profile(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    model: str
    hardware: str
    source: str = Field(description="where the numbers come from")
    kv_bytes_per_token: int = Field(gt=0, description="2 × layers × kv_heads × head_dim × dtype bytes")
    kv_capacity_tokens: int = Field(gt=0, description="KV cache size at gpu_memory_utilization 0.9")
    block_size: int = Field(16, gt=0)
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(8192, gt=0)
    step_s: float = Field(gt=0)
    prefill_token_s: float = Field(ge=0)
    attn_pair_s: float = Field(ge=0)
    decode_seq_s: float = Field(ge=0)
    decode_ctx_s: float = Field(ge=0)
    request_overhead_s: float = Field(0.0, ge=0, description="frontend time per request outside the steps (HTTP, "
                                      "tokenization), seen in TTFT; measured by `kvpilot sim calibrate`")
    frontend_token_s: float = Field(0.0, ge=0, description="frontend time per prompt token (tokenization)")
    frontend_shares_core: bool = Field(False, description="the API server runs on the engine's CPU (a pinned CPU "
                                       "engine): its per-request time is serialized with the steps (sim.engine)")
    busy_frontend_s: float = Field(0.0, ge=0, description="with `frontend_shares_core`: extra front-end time of a "
                                   "request that arrives while the engine has requests running (the API server and "
                                   "the engine wait on each other's time slices); measured by `kvpilot sim calibrate "
                                   "--frontend-shares-core`")
    new_shape_s: float = Field(0.0, ge=0, description="extra time of a step whose batched token count is not among "
                               "the engine's last `shape_cache_size` distinct ones (a CPU engine builds its oneDNN "
                               "GEMM kernels per token count); 0: off; measured by `kvpilot sim calibrate`")
    new_shape_token_s: float = Field(0.0, ge=0, description="the same, per token of the step (building kernels "
                                     "for a larger count costs more)")
    shape_cache_size: int = Field(256, gt=0, description="distinct step token counts whose kernels stay built "
                                  "(oneDNN's primitive cache, 1024 entries, over the 4 GEMM shapes of a layer)")


def _kv_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    return 2 * layers * kv_heads * head_dim * dtype_bytes


# H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s. A100 SXM 80GB: 312 TFLOP/s, 2.0 TB/s.
# Efficiency assumed: linear layers ~55% of peak in prefill, attention ~35%, HBM ~75% in decode.
PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile(
        name="h100-llama3-8b", model="meta-llama/Llama-3.1-8B-Instruct", hardware="1x H100 SXM 80GB",
        source="roofline: 16 GFLOP/token at 55% of 989 TF → 30 µs/token; 16 GB of weights at 75% of 3.35 TB/s "
               "→ 6.5 ms step; KV 128 KiB/token read at 75% BW. Checked against published vLLM runs: ~7.2 ms/step "
               "ITL at batch ≤ 10 (LambdaLabsML/vllm-benchmark, 1xH100, Llama-3-8B); 442-467k KV tokens at "
               "gpu_memory_utilization 0.9 (vLLM issue #18322 log; BLIS defaults for vLLM 0.8.4); V1 online "
               "defaults for ≥ 70 GiB GPUs: max_num_seqs 1024, max_num_batched_tokens 8192 (arg_utils)",
        kv_bytes_per_token=_kv_bytes(32, 8, 128), kv_capacity_tokens=445_000, max_num_seqs=1024,
        step_s=6.5e-3, prefill_token_s=30e-6, attn_pair_s=1.5e-9, decode_seq_s=40e-6, decode_ctx_s=52e-9,
    ),
    Profile(
        name="a100-llama3-8b", model="meta-llama/Llama-3.1-8B-Instruct", hardware="1x A100 SXM 80GB",
        source="roofline: 16 GFLOP/token at 55% of 312 TF → 93 µs/token; 16 GB at 75% of 2.0 TB/s → 10.7 ms "
               "step; KV read at 75% BW. Checked: ~11.5 ms/step ITL at batch ≤ 10 (LambdaLabsML/vllm-benchmark, "
               "1xA100-80GB, Llama-3-8B); capacity as H100 (same memory); V1 defaults for A100: 256 seqs, "
               "2048 batched tokens (arg_utils)",
        kv_bytes_per_token=_kv_bytes(32, 8, 128), kv_capacity_tokens=445_000, max_num_batched_tokens=2048,
        step_s=10.7e-3, prefill_token_s=93e-6, attn_pair_s=4.8e-9, decode_seq_s=60e-6, decode_ctx_s=87e-9,
    ),
    Profile(
        name="h100-qwen2.5-7b", model="Qwen/Qwen2.5-7B-Instruct", hardware="1x H100 SXM 80GB",
        source="roofline: 15.2 GFLOP/token → 28 µs/token; 15.2 GB weights → 6.1 ms step; KV 56 KiB/token "
               "(28 layers, 4 KV heads × 128). Checked: 1.08M KV tokens on H100 (BLIS defaults, vLLM 0.8.4); "
               "no published H100 latency found, A100 batch-1 84 tok/s (Qwen2.5 speed benchmark) scales to ~7 ms",
        kv_bytes_per_token=_kv_bytes(28, 4, 128), kv_capacity_tokens=1_000_000, max_num_seqs=1024,
        step_s=6.1e-3, prefill_token_s=28e-6, attn_pair_s=1.2e-9, decode_seq_s=40e-6, decode_ctx_s=23e-9,
    ),
    Profile(
        name="h100-qwen2.5-0.5b", model="Qwen/Qwen2.5-0.5B-Instruct", hardware="1x H100 SXM 80GB",
        source="roofline, launch-bound: 1 GFLOP/token → 2 µs/token; 1 GB of weights is read in < 1 ms, so the "
               "step is dominated by kernel launches (~2.5 ms without CUDA graphs); KV 12 KiB/token "
               "(24 layers, 2 KV heads × 64). Checked: 3.2 ms/token at batch 1 on A100 (Qwen2.5 speed benchmark). "
               "Capacity capped at 200k tokens to keep tests small",
        kv_bytes_per_token=_kv_bytes(24, 2, 64), kv_capacity_tokens=200_000,
        step_s=2.5e-3, prefill_token_s=2e-6, attn_pair_s=0.1e-9, decode_seq_s=10e-6, decode_ctx_s=5e-9,
    ),
)}


def get_profile(name: str) -> Profile:
    """A built-in profile by name, or a calibrated one from the JSON `kvpilot sim calibrate --out` wrote."""
    if name.endswith(".json"):
        doc = json.loads(Path(name).read_text())
        return Profile.model_validate(doc.get("profile", doc))
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
