"""The results page of bench/sim_fidelity.py: the run's setting, the fitted profile, and real vs
simulated latencies per rate (bench/results/sim_fidelity.md). Apart from the measuring so that
the page's wording and tables can change without touching how anything is measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from kvpilot.sim.profiles import Profile

COEFFICIENTS = ("step_s", "prefill_token_s", "attn_pair_s", "decode_seq_s", "decode_ctx_s", "request_overhead_s",
                "frontend_token_s", "busy_frontend_s", "new_shape_s", "new_shape_token_s")


def write_md(args: argparse.Namespace, profile: Profile, spread: tuple[float, float], calibrations: int,
             rows: list[dict[str, object]], cal_s: float) -> None:
    def err(real: float, sim: float) -> str:
        return f"{(sim - real) / real:+.0%}"

    placement = f"pinned to core {args.cpu} (taskset)" if args.cpu is not None else "vLLM's own CPU binding"
    lines = [
        "# Simulator fidelity against real vLLM (CPU, tiny model)", "",
        f"Command: `{' '.join(['.venv/bin/python -P bench/sim_fidelity.py', *sys.argv[1:]])}`", "",
        f"Engine: vLLM 0.32.0 CPU build, tiny random Llama (2 layers, hidden 128), float32, eager, "
        f"{placement}{'' if args.nice is None else f', nice {args.nice}'}, "
        f"1 GiB KV cache. Machine: {args.hardware}, Python {platform.python_version()}, load average "
        f"{args.load_before:.1f} before and {os.getloadavg()[0]:.1f} after (other jobs shared the cores). "
        f"Calibration took {cal_s:.0f} s in all"
        + (f"; warming every prompt length up to {args.warm_shapes} tokens first took {args.warm_s:.0f} s."
           if args.warm_shapes else "."), "",
        f"Profile: one fit through the points of all {calibrations} calibrations (before the first replay, "
        "between replays, after the last; seconds; with its points in `sim_fidelity_profile.json`): "
        + ", ".join(f"{k} {getattr(profile, k):.3g}" for k in COEFFICIENTS)
        + f". The calibrations fitted one by one disagree by {spread[0]:.0%} on a decode step and {spread[1]:.0%} "
        "on a 400-token request's TTFT ((max − min) / mean).", "",
        "Mix per rate: Poisson arrivals, prompts 64-700 tokens, outputs 16-96 tokens, unique prompts, seed "
        f"{args.seed} for the first rate, +1 for each next. TTFT and TPOT are client-side on the real engine. "
        "The simulator spends the profile's "
        "front-end time " + ("on the engine's core (`frontend_shares_core`: done before the next step's forward "
                             "pass, which the request joins)" if args.cpu is not None else "in TTFT only") + ".", "",
        "| rate req/s | requests | TTFT p50 real / sim (err) | TTFT p90 real / sim | TPOT p50 real / sim (err) "
        "| TPOT p90 real / sim |",
        "|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        t, p = r["ttft"], r["tpot"]
        assert isinstance(t, list) and isinstance(p, list)
        lines.append(f"| {r['rate']} | {r['requests']} | {t[0] * 1e3:.1f} / {t[1] * 1e3:.1f} ms ({err(t[0], t[1])}) "
                     f"| {t[2] * 1e3:.1f} / {t[3] * 1e3:.1f} ms | {p[0] * 1e3:.2f} / {p[1] * 1e3:.2f} ms "
                     f"({err(p[0], p[1])}) | {p[2] * 1e3:.2f} / {p[3] * 1e3:.2f} ms |")
    lines += ["", "Where the real TTFT goes (means, ms; vLLM's histograms over the replay): the client's TTFT, vLLM's "
              "own TTFT (from the request's arrival in the API server's input processor), queued in the scheduler, "
              "prefill inside the engine core (sim prefill: the same span in the simulator, the step that "
              "prefills it, less its own front-end work, which vLLM does before the engine core sees the request); "
              "the rest of the client's TTFT is "
              "front-end work (HTTP, tokenizing, "
              "the hand-offs to and from the engine core) and waiting for the step in flight.", "",
              "Others on core: the share of the engine's core that went to other jobs during the replay "
              "(/proc/stat of the core less the engine's processes' CPU time; 0 on an idle machine).", "",
              "| rate req/s | client TTFT | vLLM TTFT | queued | prefill | rest | sim TTFT | sim prefill "
              "| others on core |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["breakdown"]
        assert isinstance(b, dict)
        rest = b["client_ttft"] - b["request_queue_time_seconds"] - b["request_prefill_time_seconds"]
        lines.append(f"| {r['rate']} | {b['client_ttft']:.1f} | {b['time_to_first_token_seconds']:.1f} | "
                     f"{b['request_queue_time_seconds']:.1f} | {b['request_prefill_time_seconds']:.1f} | {rest:.1f} | "
                     f"{r['sim_ttft_mean']:.1f} | {r['sim_prefill_mean']:.1f} | {r['cpu_wait']:.0%} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written {args.out}")
