"""`kvpilot sim serve` and `kvpilot sim cluster`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kvpilot.sim.profiles import PROFILES, get_profile


def register(sub: Any) -> None:
    sim = sub.add_parser("sim", help="the vLLM-compatible GPU simulator")
    simsub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", required=True)

    serve = simsub.add_parser("serve", help="a simulated vLLM worker with vLLM's HTTP API and metrics")
    serve.add_argument("--profile", default="h100-llama3-8b",
                       help=f"one of {', '.join(sorted(PROFILES))}, or a calibrated profile's JSON file")
    serve.add_argument("--model", default="sim-model", help="served model name")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--time-scale", type=float, default=1.0, help="run N× faster than the profile")
    serve.add_argument("--block-size", type=int)
    serve.add_argument("--kv-capacity-tokens", type=int)
    serve.add_argument("--max-model-len", type=int, default=131072)
    serve.add_argument("--error-rate", type=float, default=0.0, help="share of requests failed with 500")
    serve.add_argument("--crash-after-tokens", type=int, help="exit after generating this many tokens")
    serve.add_argument("--slow-start", type=float, default=0.0, help="seconds /health answers 503")
    serve.add_argument("--kv-store", help="redis://HOST:PORT/DB (several, comma-separated: sharded by block): "
                       "P/D hands real KV bytes over through it")
    serve.add_argument("--seed", type=int, default=0)
    serve.set_defaults(handler=_serve)

    cluster = simsub.add_parser("cluster", help="N engines in virtual time, fed by a trace or synthetic workload")
    cluster.add_argument("--instances", type=int, default=8)
    cluster.add_argument("--profile", default="h100-llama3-8b",
                       help=f"one of {', '.join(sorted(PROFILES))}, or a calibrated profile's JSON file")
    cluster.add_argument("--block-size", type=int, help="KV block size (default: the profile's)")
    cluster.add_argument("--policy", default="round-robin")
    cluster.add_argument("--workload", choices=["mooncake", "azure-conv", "synthetic", "agentic", "chat", "rag",
                                                "no-reuse"], default="mooncake",
                         help="a trace (mooncake, azure-conv) or a generator of the family in kvpilot.sim.families "
                              "(agentic, chat, rag, no-reuse: at --rate, seeded by --seed)")
    cluster.add_argument("--requests", type=int, default=2000, help="requests to take from the workload")
    cluster.add_argument("--speedup", type=float, default=1.0, help="compress the trace's time (rate ×)")
    cluster.add_argument("--rate", type=float, default=10.0, help="generated workloads: requests per second")
    cluster.add_argument("--slo-ttft", type=float, default=5.0, help="TTFT SLO in seconds")
    cluster.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds (optional)")
    cluster.add_argument("--rebalance", choices=["none", "queued", "live"], default="none",
                         help="move requests off hot spots: queued ones only, or running ones too (live migration)")
    cluster.add_argument("--theta", type=float, default=0.8, help="rebalance: a hot spot is over θ × SLO")
    cluster.add_argument("--shared-store", action="store_true",
                         help="a KV store every engine saves its prompts to and loads from (vLLM with kvpilot's "
                              "Redis connector)")
    cluster.add_argument("--share-prefixes", action="store_true",
                         help="with --shared-store: the router's cross-instance sharing option")
    cluster.add_argument("--store-token-cost", type=float, default=0.25,
                         help="a token loaded from the store, in prefill tokens")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--json", type=Path, help="write the report (with per-request rows) here")
    cluster.set_defaults(handler=_cluster)

    cal = simsub.add_parser("calibrate", help="measure a real engine and fit a simulator profile (JSON)")
    cal.add_argument("--base-url", required=True, help="the engine's OpenAI-compatible server, e.g. http://host:8000")
    cal.add_argument("--model", required=True, help="served model name")
    cal.add_argument("--out", type=Path, required=True, help="write the profile JSON here")
    cal.add_argument("--name", help="profile name (default: calibrated-<model>)")
    cal.add_argument("--hardware", default="unknown", help="what the engine runs on, for the record")
    cal.add_argument("--kv-bytes-per-token", type=int, default=1, help="2 × layers × kv_heads × head_dim × dtype")
    cal.add_argument("--prompt-lengths", default="64,128,256,384,512,768", help="prefill sweep, tokens")
    cal.add_argument("--batches", default="1,2,4,8,16", help="decode sweep, concurrent streams")
    cal.add_argument("--decode-prompts", default="32,384", help="decode sweep prompt lengths, tokens")
    cal.add_argument("--decode-tokens", type=int, default=48)
    cal.add_argument("--repeats", type=int, default=3)
    cal.add_argument("--warmup", type=int, default=6, help="requests sent first and discarded")
    cal.add_argument("--shape-pairs", type=int, default=24,
                     help="prefill pairs (a token count not sent before, then again) measuring the cost of a step "
                          "whose kernels are not built yet (a CPU engine); 0: skip, new_shape_s 0")
    cal.add_argument("--shape-cache-size", type=int, default=256,
                     help="distinct step token counts the engine keeps kernels for (oneDNN: 1024 primitives, "
                          "4 GEMM shapes per count)")
    cal.add_argument("--frontend-shares-core", action="store_true",
                     help="the API server runs on the engine's core (a CPU engine pinned to one core): the profile "
                          "serializes its per-request work with the steps")
    cal.add_argument("--max-num-seqs", type=int, default=256)
    cal.add_argument("--max-num-batched-tokens", type=int, default=8192)
    cal.add_argument("--seed", type=int, default=0)
    cal.set_defaults(handler=_calibrate)


def _serve(args: argparse.Namespace) -> int:
    from kvpilot.sim.server import ServeConfig
    from kvpilot.sim.worker import serve

    serve(ServeConfig(
        profile=get_profile(args.profile), model=args.model, host=args.host, port=args.port,
        time_scale=args.time_scale, block_size=args.block_size,
        kv_capacity_tokens=args.kv_capacity_tokens, max_model_len=args.max_model_len, error_rate=args.error_rate,
        crash_after_tokens=args.crash_after_tokens, slow_start_s=args.slow_start, seed=args.seed,
        kv_store=args.kv_store))
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from kvpilot.sim.cluster import Cluster, ClusterConfig
    from kvpilot.sim.report import print_report
    from kvpilot.sim.workload import SyntheticConfig, azure_conv, mooncake, synthetic

    if args.workload == "mooncake":
        specs = mooncake(speedup=args.speedup, limit=args.requests)
    elif args.workload == "azure-conv":
        specs = azure_conv(speedup=args.speedup, limit=args.requests)
    elif args.workload == "synthetic":
        specs = synthetic(SyntheticConfig(requests=args.requests, rate=args.rate, seed=args.seed))
    else:
        from kvpilot.sim.families import make_workload

        specs = make_workload(args.workload, args.requests, args.rate, args.seed)
    cfg = ClusterConfig(instances=args.instances, profile=args.profile, block_size=args.block_size,
                        policy=args.policy, seed=args.seed, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot,
                        shared_store=args.shared_store, route_by_store=args.share_prefixes,
                        store_token_cost=args.store_token_cost)
    cluster = Cluster(cfg)
    if args.rebalance != "none":
        from kvpilot.sim.migration_cluster import RebalanceConfig, Rebalancer
        from kvpilot.sim.profiles import get_profile

        profile = get_profile(args.profile)
        cluster.rebalancer = Rebalancer(
            RebalanceConfig(mode=args.rebalance, theta=args.theta, slo_tpot_s=args.slo_tpot or 0.1,
                            slo_ttft_s=args.slo_ttft), profile.kv_bytes_per_token, profile.prefill_token_s)
    t0 = time.perf_counter()
    report = cluster.run(specs)
    wall = time.perf_counter() - t0
    print_report(report, wall)
    if args.json:
        doc: dict[str, Any] = report.to_json(with_requests=True)
        doc["wall_s"] = wall
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"report written to {args.json}", file=sys.stderr)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import asyncio

    from kvpilot.sim.calibrate import engine_cache_info, kv_geometry, measure
    from kvpilot.sim.calibrate_fit import fit_profile

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    info = engine_cache_info(args.base_url)
    block_size, capacity = kv_geometry(info)
    t0 = time.perf_counter()
    m = asyncio.run(measure(args.base_url, args.model, prompt_lengths=ints(args.prompt_lengths),
                            batches=ints(args.batches), decode_prompts=ints(args.decode_prompts),
                            decode_tokens=args.decode_tokens, repeats=args.repeats, seed=args.seed,
                            warmup=args.warmup, shape_pairs=args.shape_pairs,
                            busy_rounds=args.repeats if args.frontend_shares_core else 0))
    prefill, decode = m.prefill, m.decode
    profile = fit_profile(
        prefill, decode, name=args.name or f"calibrated-{args.model}", model=args.model, hardware=args.hardware,
        source=f"measured: kvpilot sim calibrate against {args.base_url} ({len(prefill)} prefill and "
               f"{len(decode)} decode points, {time.perf_counter() - t0:.0f} s)",
        block_size=block_size, kv_capacity_tokens=capacity,
        kv_bytes_per_token=args.kv_bytes_per_token, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, frontend_shares_core=args.frontend_shares_core,
        shapes=m.shapes, shape_cache_size=args.shape_cache_size, busy=m.busy)
    args.out.write_text(json.dumps(m.document(profile), indent=1))
    print(json.dumps(profile.model_dump(), indent=1))
    return 0
