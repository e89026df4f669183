"""p99 TTFT and TPOT under a skewed workload: live migration vs queued-only rebalancing vs none.

    .venv/bin/python -P bench/migration_cluster.py [--instances 8] [--requests 3000] [--rate 20] [--policy affinity]

The virtual-time cluster (`kvpilot sim cluster`'s engine model and event loop) runs the same
seeded synthetic workload three times — Zipf-skewed tenants with long shared system prompts,
routed by prefix affinity so the popular tenants' instances become hot spots — with the
rebalancer off, moving only queued requests, and live-migrating running ones (see
`kvpilot.sim.migration_cluster` for what each mode models). Same routing policy, same trigger
(predicted TPOT or backlog over θ·SLO, the router's pure policy). Results:
bench/results/kv_migration.md.
"""

from __future__ import annotations

import argparse
import time
from typing import get_args

from kvpilot.sim.cluster import Cluster, ClusterConfig
from kvpilot.sim.migration_cluster import Mode, RebalanceConfig, Rebalancer
from kvpilot.sim.profiles import get_profile
from kvpilot.sim.workload import SyntheticConfig, synthetic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--policy", default="affinity")
    parser.add_argument("--profile", default="h100-llama3-8b")
    parser.add_argument("--skew", type=float, default=1.2, help="Zipf exponent over tenants")
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-tpot", type=float, default=0.05)
    parser.add_argument("--theta", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    specs = synthetic(SyntheticConfig(requests=args.requests, rate=args.rate, tenants=16, tenant_skew=args.skew,
                                      system_prompt_segments=(8, 16), output_tokens=(64, 1024), seed=args.seed))
    profile = get_profile(args.profile)
    print(f"{len(specs)} requests, {args.instances} × {args.profile}, policy {args.policy}, "
          f"SLO TTFT {args.slo_ttft} s / TPOT {args.slo_tpot * 1000:.0f} ms, θ {args.theta}\n")
    print("| rebalancing | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms | SLO attainment | "
          "moves (live / queued) | KV copied GB | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in get_args(Mode):
        cfg = ClusterConfig(instances=args.instances, profile=args.profile, policy=args.policy, seed=args.seed,
                            slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot)
        cluster = Cluster(cfg)
        reb = Rebalancer(RebalanceConfig(mode=mode, theta=args.theta, slo_tpot_s=args.slo_tpot,
                                         slo_ttft_s=args.slo_ttft), profile.kv_bytes_per_token,
                         profile.prefill_token_s)
        cluster.rebalancer = reb
        t0 = time.perf_counter()
        s = cluster.run(specs).summary
        wall = time.perf_counter() - t0
        st = reb.stats
        print(f"| {mode} | {s['ttft_p50_s']:.2f} | {s['ttft_p99_s']:.2f} | {s['tpot_p50_s'] * 1000:.1f} | "
              f"{s['tpot_p99_s'] * 1000:.1f} | {s['slo_attainment']:.3f} | {st.live_moves} / {st.queued_moves} | "
              f"{st.bytes_copied / 1e9:.1f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
