"""kvpilot's vLLM v1 KV connector: full KV blocks in Redis, content-addressed by vLLM's block hashes.

Load it with
  --kv-transfer-config '{"kv_connector":"KvpilotRedisConnector",
    "kv_connector_module_path":"kvpilot.kvtransfer.vllm_connector","kv_role":"kv_both",
    "kv_load_failure_policy":"recompute",
    "kv_connector_extra_config":{"redis_url":"redis://127.0.0.1:6379/0"}}'
(`redis_url` may list several servers, comma-separated: blocks are spread over them by
rendezvous hashing, `ShardedStore`). Other extra settings: `ttl_s` (3600), `timeout_s` (0.5),
`backoff_s` (2), `save_queue` (64 pending step snapshots), `pd_wait_s` (2: how long a P/D decode
request waits for the prefill side's blocks to land). kvpilot must be importable in vLLM's
processes (`pip install kvpilot` into the engine's environment, or PYTHONPATH).

What it does (decisions in `vllm_blocks.BlockPlanner`, I/O in `vllm_io.StoreClient`):
- scheduler, new request: one pipelined EXISTS over the request's block keys; the leading run
  of stored blocks beyond the local prefix-cache hit is loaded (synchronously, before the
  forward pass) instead of computed;
- worker, every step: blocks that became full (prompt blocks after prefill, and each block as
  decoding fills it) are snapshotted inside the step (`index_select`, a copy) and written by a
  background thread; a step never waits on Redis;
- a block that is missing, evicted or unreadable when loaded is reported through
  `get_block_ids_with_load_errors` and vLLM recomputes it (requires
  `kv_load_failure_policy: recompute`); Redis down is a miss, counted, never a failed request.
- a request with `kv_transfer_params.kvpilot_report` (the router pre-warming this engine for a
  scale event) answers with a `protocol.WarmReport`: tokens from the local cache and the store;
- P/D: a request with `kv_transfer_params.do_remote_decode` answers with params for the decode
  side (`do_remote_prefill`, `kvpilot_blocks`); the decode side waits up to `pd_wait_s` for
  that many blocks, then loads what is there.
- resume (`router/resume_cut.py`): a continuation with `kv_transfer_params.kvpilot_resume_blocks`
  waits up to its `kvpilot_wait_s` for that many leading blocks (the source's write of the block
  it filled just before the cut may still be in flight), then loads what is there.
Counters reach vLLM's /metrics as `vllm:kvpilot_kv_*` (see `KvpilotPromMetrics`).

This module imports without vLLM (the classes are then absent), so kvpilot's own checks run
in an environment without it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from kvpilot.kvtransfer.protocol import WARM_REPORT, resume_wait
from kvpilot.kvtransfer.vllm_blocks import (
    BlockPlanner,
    ReqOps,
    block_key,
    join_layers,
    namespace,
    rank_present,
    split_layers,
    warm_answer,
)
from kvpilot.kvtransfer.vllm_io import COUNTERS, StoreClient

try:  # vLLM is only in the engine's environment
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
    from vllm.v1.metrics.utils import create_metric_per_engine
except ImportError:  # pragma: no cover - exercised by importing without vLLM
    HAVE_VLLM = False
else:
    HAVE_VLLM = True

STORE_TAG = "kvpilot-redis"


def _extra(cfg: Any, key: str, default: Any) -> Any:
    return cfg.get_from_extra_config(key, default)


if HAVE_VLLM:

    @dataclass
    class KvpilotMeta(KVConnectorMetadata):  # type: ignore[misc]
        reqs: list[ReqOps] = field(default_factory=list)

    @dataclass
    class KvpilotStats(KVConnectorStats):  # type: ignore[misc]
        """Counter deltas from one worker or the scheduler; vLLM sums them and hands them to the logger."""

        def __post_init__(self) -> None:
            for k in COUNTERS:
                self.data.setdefault(k, 0)

        def reset(self) -> None:
            self.data = dict.fromkeys(COUNTERS, 0)

        def aggregate(self, other: KVConnectorStats) -> KvpilotStats:
            for k in COUNTERS:
                self.data[k] = self.data.get(k, 0) + other.data.get(k, 0)
            return self

        def reduce(self) -> dict[str, int | float]:
            return {k: self.data.get(k, 0) for k in COUNTERS}

        def is_empty(self) -> bool:
            return not any(self.data.get(k, 0) for k in COUNTERS)

    _DOCS = {
        "lookups": "store lookups (one per new request)", "lookup_errors": "store lookups that failed",
        "hit_blocks": "blocks the store held at lookup and were scheduled for loading",
        "loaded_blocks": "blocks loaded into the KV cache", "loaded_bytes": "bytes loaded from the store",
        "failed_loads": "blocks whose load failed (missing, evicted, store down): recomputed",
        "saved_blocks": "blocks written to the store", "saved_bytes": "bytes written to the store",
        "failed_saves": "blocks whose write failed (a future miss)",
        "dropped_saves": "blocks not written because the save queue was full or the store down"}

    class KvpilotPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
        """`vllm:kvpilot_kv_<counter>_total`, plus `vllm:kvpilot_kv_num_failed_transfers_total`
        (failed loads, saves and lookups: NIXL's `…_num_failed_transfers` for this connector)."""

        def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str],
                     per_engine_labelvalues: dict[int, list[object]]) -> None:
            super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
            self.counters = {k: create_metric_per_engine(
                self._counter_cls(name=f"vllm:kvpilot_kv_{k}", documentation=doc, labelnames=labelnames),
                per_engine_labelvalues) for k, doc in _DOCS.items()}
            self.failed = create_metric_per_engine(self._counter_cls(
                name="vllm:kvpilot_kv_num_failed_transfers", labelnames=labelnames,
                documentation="failed KV store transfers (loads, saves, lookups)"), per_engine_labelvalues)

        def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
            for k, counter in self.counters.items():
                if transfer_stats_data.get(k):
                    counter[engine_idx].inc(transfer_stats_data[k])
            failed = sum(int(transfer_stats_data.get(k, 0)) for k in ("failed_loads", "failed_saves", "lookup_errors"))
            if failed:
                self.failed[engine_idx].inc(failed)

    class KvpilotRedisConnector(KVConnectorBase_V1):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
            cfg = self._kv_transfer_config
            mc, pc = vllm_config.model_config, vllm_config.parallel_config
            self.block_size = int(vllm_config.cache_config.block_size)
            self.tp_size = int(pc.tensor_parallel_size)
            self.rank = 0
            if role == KVConnectorRole.WORKER and self.tp_size > 1:
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
                self.rank = int(get_tensor_model_parallel_rank())
            cache_dtype = str(vllm_config.cache_config.cache_dtype)
            self.ns = namespace(
                model=str(mc.model), revision=mc.revision, dtype=str(mc.dtype).removeprefix("torch."),
                cache_dtype=cache_dtype, block_size=self.block_size, num_layers=mc.get_num_layers(pc),
                num_kv_heads=mc.get_num_kv_heads(pc), head_size=mc.get_head_size(),
                tp_size=self.tp_size, device=str(vllm_config.device_config.device_type))
            urls = str(_extra(cfg, "redis_url", os.environ.get("KVPILOT_REDIS_URL", "redis://127.0.0.1:6379/0")))
            self.engine_id = str(cfg.engine_id)
            self.store = StoreClient(urls, self.ns, name=f"{self.engine_id}-{role.name.lower()}",
                                     ttl_s=int(_extra(cfg, "ttl_s", 3600)),
                                     timeout_s=float(_extra(cfg, "timeout_s", 0.5)),
                                     backoff_s=float(_extra(cfg, "backoff_s", 2.0)),
                                     save_queue=int(_extra(cfg, "save_queue", 64)))
            self.planner = BlockPlanner(self.block_size, save=bool(cfg.is_kv_producer),
                                        pd_wait_s=float(_extra(cfg, "pd_wait_s", 2.0)))
            self._requests: dict[str, Any] = {}
            # worker side
            self.kv_caches: dict[str, Any] = {}
            self.layers: list[str] = []
            self._snaps: dict[str, Any] = {}
            self._load_errors: set[int] = set()

        @property
        def requires_kv_delivery(self) -> bool:
            return False  # a best-effort cache: a dropped save is a future miss

        # -- scheduler side -------------------------------------------------------------------

        def _keys(self, hashes: list[bytes]) -> list[str]:
            return [block_key(h, r) for h in hashes for r in range(self.tp_size)]

        def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
            hashes = list(request.block_hashes)
            limit = min(len(hashes), max(0, (request.num_tokens - 1) // self.block_size))
            present = rank_present(self.store.present(self._keys(hashes[:limit])), self.tp_size)
            params = request.kv_transfer_params or {}
            expected = int(params.get("kvpilot_blocks", 0)) if params.get("do_remote_prefill") else 0
            wait_s: float | None = None
            if not expected:  # a resume: the source's last block may still be on its way
                expected, wait_s = resume_wait(params)
            if not self.store.available():
                expected = 0  # the store is down: nothing to wait for
            n = self.planner.matched(request.request_id, request.num_tokens, hashes, num_computed_tokens, present,
                                     expected_blocks=expected, now=time.monotonic(), wait_s=wait_s)
            self._requests[request.request_id] = request
            return n, False

        def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
            self._requests[request.request_id] = request
            self.planner.allocated(request.request_id, list(request.block_hashes), blocks.get_block_ids()[0],
                                   num_external_tokens)
            if num_external_tokens:
                self.store.count(hit_blocks=num_external_tokens // self.block_size)

        def build_connector_meta(self, scheduler_output: Any) -> KvpilotMeta:
            so = scheduler_output
            steps: list[tuple[str, int, list[int], list[bytes]]] = []
            todo = [(r.req_id, r.num_computed_tokens) for r in so.scheduled_new_reqs]
            cached = so.scheduled_cached_reqs
            todo += list(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
            for req_id, computed in todo:
                req = self._requests.get(req_id)
                if req is None or self._kv_cache_manager is None:
                    continue
                ids = list(self._kv_cache_manager.get_block_ids(req_id)[0])
                steps.append((req_id, computed + so.num_scheduled_tokens.get(req_id, 0), ids,
                              list(req.block_hashes)))
            return KvpilotMeta(reqs=self.planner.step(steps))

        def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
            tr = self.planner.finished(request.request_id)
            self._requests.pop(request.request_id, None)
            params = request.kv_transfer_params or {}
            if params.get(WARM_REPORT):  # the router pre-warming this engine: say what was loaded
                report = warm_answer(tr, request.num_prompt_tokens, self.block_size, len(request.block_hashes))
                return False, report.wire()
            if not params.get("do_remote_decode"):
                return False, None
            saved = min(tr.saved_upto if tr else 0, (request.num_prompt_tokens - 1) // self.block_size)
            # vLLM's P/D fields (the router forwards them verbatim) plus where the blocks are.
            return False, {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                           "remote_request_id": request.request_id, "remote_block_ids": [], "kv_store": STORE_TAG,
                           "kv_namespace": self.ns, "kvpilot_blocks": saved, "num_tokens": saved * self.block_size}

        def get_kv_connector_stats(self) -> KvpilotStats | None:
            stats = KvpilotStats(data=self.store.take_counts())
            return None if stats.is_empty() else stats

        @classmethod
        def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvpilotStats | None:
            return KvpilotStats(data=dict(data or {}))

        @classmethod
        def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: list[str],
                               per_engine_labelvalues: dict[int, list[object]]) -> KvpilotPromMetrics:
            return KvpilotPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        # -- worker side ----------------------------------------------------------------------

        def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
            self.kv_caches = dict(kv_caches)
            self.layers = sorted(kv_caches)

        def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
            meta = self._get_connector_metadata()
            loads = [(bid, h) for ops in meta.reqs for bid, h in ops.load]
            if not loads or not self.layers:
                return
            got = self.store.load([block_key(h, self.rank) for _, h in loads])
            if got is None:
                self._load_errors.update(bid for bid, _ in loads)
                return
            for (bid, _), value in zip(loads, got, strict=True):
                try:
                    parts = split_layers(value, len(self.layers))
                    for name, raw in zip(self.layers, parts, strict=True):
                        dst = self.kv_caches[name][bid]
                        src = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                        dst.copy_(src.view(dst.dtype).view(dst.shape))
                except (ValueError, RuntimeError):  # a block of another layout: recompute it
                    self._load_errors.add(bid)
                    self.store.count(failed_loads=1)

        def wait_for_layer_load(self, layer_name: str) -> None:
            return None  # loads finish in start_load_kv, before the forward pass

        def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
            meta = self._get_connector_metadata()
            ids = [bid for ops in meta.reqs for bid, _ in ops.save]
            if ids:  # a copy now (the block may be reused once the step ends); bytes and I/O later
                self._snaps[layer_name] = kv_layer.index_select(0, torch.tensor(ids, device=kv_layer.device))

        def wait_for_save(self) -> None:
            snaps, self._snaps = self._snaps, {}
            if not snaps or not self.has_connector_metadata():
                return
            hashes = [h for ops in self._get_connector_metadata().reqs for _, h in ops.save]
            if any(name not in snaps for name in self.layers):
                self.store.count(dropped_saves=len(hashes))  # a layer was skipped: never store half a block
                return
            layers, rank = [snaps[n] for n in self.layers], self.rank

            def job() -> list[tuple[str, bytes]]:
                host = [t.to("cpu").contiguous().view(torch.uint8) for t in layers]
                return [(block_key(h, rank), join_layers([t[i].numpy().tobytes() for t in host]))
                        for i, h in enumerate(hashes)]

            self.store.save_later(job, len(hashes))

        def get_block_ids_with_load_errors(self) -> set[int]:
            out, self._load_errors = self._load_errors, set()
            return out

        def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
            return None, None

        def shutdown(self) -> None:
            self.store.flush(5.0)
            self.store.close()
