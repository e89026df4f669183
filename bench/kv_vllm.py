"""KV over Redis between two real vLLM engines (CPU build, tiny model): migration blocking time and
hot-prefix TTFT after a handover, with kvpilot's `KvpilotRedisConnector`.

Two engines (one core each) share one Redis (maxmemory + allkeys-lru) through the connector:
- migration: a greedy stream through `kvpilot router` (engine: vllm, migration) is asked to move
  after 40 tokens and resumed on the other engine (`POST /kvpilot/migrate`); blocking = the router's
  `blocking_ms` (cut → the target's first token), and what the target loaded vs computed. Each rep
  moves one stream per cut mode, through one router per mode in front of the same engines, so the
  modes see the same load: `off` cuts at once (`alignCutTokens: 0`), `aligned` waits for the stream
  to pass a KV block boundary (the default: at most 128 tokens, slack 1; router/resume_cut.py),
  `precopy` also warms the target with the blocks saved so far while the cut waits;
- TTFT of a prompt of `ctx` tokens on engine B: cold (never seen), external (engine A computed it:
  B loads it from Redis, the ring successor after A leaves), warm (B's own prefix cache).

Usage: .venv/bin/python -P bench/kv_vllm.py [--contexts 2048 8192] [--reps 3] [--modes off aligned] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from kvpilot.testing.redis import RedisServer
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.vllm import SERVED, VLLMServer, kvpilot_overlay, tiny_model

EXTERNAL = {"source": "external_kv_transfer"}
LOCAL = {"source": "local_compute"}
CUT_AFTER = 40
# The router's migration config per cut mode (router/migration_policy.py, MigrationConfig).
MODES: dict[str, dict[str, Any]] = {"off": {"alignCutTokens": 0}, "aligned": {}, "precopy": {"preCopy": True}}


def kv_config(url: str) -> str:
    return json.dumps({"kv_connector": "KvpilotRedisConnector",
                       "kv_connector_module_path": "kvpilot.kvtransfer.vllm_connector", "kv_role": "kv_both",
                       "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"redis_url": url}})


def ids(seed: str, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(n)]


def text(seed: str, n: int) -> str:
    """About `n` tokens of text (the router takes string prompts): random words cut at `n` tokens."""
    from kvpilot.router.kv_events import load_tokenizer

    tok = load_tokenizer(str(tiny_model()))
    rng = random.Random(seed)
    words = " ".join(rng.choice(("return", "value", "import", "class", "self", "None", "list", "dict", "cache",
                                 "block", "token", "yield", "while", "lambda")) for _ in range(n))
    return str(tok.decode(tok.encode(words).ids[:n]))


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def ttft(server: VLLMServer, prompt: list[int]) -> float:
    body = {"model": SERVED, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            if raw.startswith(b"data: {"):
                return (time.perf_counter() - start) * 1000
    raise RuntimeError("no token")


# Where the target's part of the blocking goes, from vLLM's own per-request histograms (their sums).
PHASES = {"engine_ttft": "vllm:time_to_first_token_seconds", "queue": "vllm:request_queue_time_seconds",
          "prefill": "vllm:request_prefill_time_seconds"}


def phase_sums(server: VLLMServer) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    sums = dict.fromkeys(PHASES, 0.0)
    wanted = {family: key for key, family in PHASES.items()}
    for family in text_string_to_metric_families(server.metrics_text()):
        key = wanted.get(family.name)
        if key is not None:
            sums[key] += sum(x.value for x in family.samples if x.name == family.name + "_sum")
    return sums


def migrate_once(router: RouterProcess, servers: dict[str, VLLMServer], prompt: str, rid: str) -> dict[str, Any]:
    other = {"a": "b", "b": "a"}
    body = {"model": SERVED, "prompt": prompt, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    req = urllib.request.Request(router.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-Id": rid})
    result: dict[str, Any] = {}
    before: dict[str, tuple[float, float]] = {}
    thread: threading.Thread | None = None
    n = 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        source = str(resp.headers["X-Kvpilot-Endpoint"])
        target = other[source]
        for raw in resp:
            if raw.startswith(b"data: {"):
                n += 1
                if n == CUT_AFTER:
                    t = servers[target]
                    before[target] = (t.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL),
                                      t.metric("vllm:prompt_tokens_by_source_total", **LOCAL))
                    phases = phase_sums(t)
                    thread = threading.Thread(target=lambda: result.update(
                        post(router.admin_url + "/kvpilot/migrate", {"request_id": rid, "target": target})))
                    thread.start()
    assert thread is not None
    thread.join()
    t = servers[target]
    result["loaded"] = t.metric("vllm:prompt_tokens_by_source_total", **EXTERNAL) - before[target][0]
    result["computed"] = t.metric("vllm:prompt_tokens_by_source_total", **LOCAL) - before[target][1]
    # The resumed request is the target's only one in this window (it finished with the stream).
    after = phase_sums(t)
    result.update({f"{k}_ms": (after[k] - phases[k]) * 1000 for k in PHASES})
    return result


def summary(ctx: int, mode: str, ms: list[dict[str, Any]]) -> str:
    """One row per context and cut mode: medians (max where the tail matters)."""
    med = statistics.median
    blocking = [float(m["blocking_ms"]) for m in ms]
    return (f"| {ctx} | {mode} | {len(ms)} | {med(blocking):.1f} | {max(blocking):.1f} | "
            f"{med(m['cut_wait_tokens'] for m in ms):.0f} | {med(m['loaded'] for m in ms):.0f} | "
            f"{med(m['computed'] for m in ms):.0f} | {max(m['computed'] for m in ms):.0f} | "
            f"{med(m['engine_ttft_ms'] for m in ms):.1f} | {med(m['prefill_ms'] for m in ms):.1f} | "
            f"{med(float(m['blocking_ms']) - m['engine_ttft_ms'] for m in ms):.1f} |")


def rep_row(ctx: int, rep: int, mode: str, m: dict[str, Any], load: float) -> str:
    tail = m.get("target_tail_tokens")
    return (f"| {ctx} | {rep} | {mode} | {float(m['blocking_ms']):.1f} | {m['resumed_tokens']} | "
            f"{m['cut_wait_tokens']} | {'-' if tail is None else tail} | {m['loaded']:.0f} | {m['computed']:.0f} | "
            f"{m['engine_ttft_ms']:.1f} | {m['queue_ms']:.1f} | {m['prefill_ms']:.1f} | "
            f"{float(m['blocking_ms']) - m['engine_ttft_ms']:.1f} | {load:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["off", "aligned"],
                    help="cut modes to compare, each rep in this order")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kv-vllm-bench-"))
    store = RedisServer(work / "redis")
    r = redis.Redis(host=store.host, port=store.port)
    r.config_set("maxmemory", "1gb")
    r.config_set("maxmemory-policy", "allkeys-lru")
    # The tiny model declares 2,048 positions; RoPE extends past them (the output is noise anyway).
    env = {"PYTHONPATH": str(kvpilot_overlay()), "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    extra = ["--max-model-len", str(max(args.contexts) + 512), "--kv-transfer-config", kv_config(store.url)]
    servers = {"a": VLLMServer.tiny(name="bench-a", workdir=work, cpu=0, env=env, extra=extra, wait=False),
               "b": VLLMServer.tiny(name="bench-b", workdir=work, cpu=1, env=env, extra=extra, wait=False)}
    routers: dict[str, RouterProcess] = {}
    rows: list[str] = []
    summaries: list[str] = []
    reps: list[str] = []
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    try:
        for s in servers.values():
            s.timeout = 1500  # a busy shared machine: startup has taken over 400 s
            s.wait()
        eps = [{"name": n, "url": s.url} for n, s in servers.items()]
        for mode in args.modes:
            routers[mode] = RouterProcess([{"name": SERVED, "policy": "round-robin", "engine": "vllm",
                                            "migration": MODES[mode], "endpoints": eps}], workdir=work / mode)
        ttft(servers["a"], ids("warmup-a", 400))
        ttft(servers["b"], ids("warmup-b", 400))
        for ctx in args.contexts:
            cold, ext, warm = [], [], []
            moves: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
            for rep in range(args.reps):
                p = ids(f"ttft-{ctx}-{rep}", ctx)
                cold.append(ttft(servers["b"], p))
                q = ids(f"ext-{ctx}-{rep}", ctx)
                ttft(servers["a"], q)                       # A computes it and saves it
                time.sleep(0.5)                             # its background writes land
                ext.append(ttft(servers["b"], q))           # B loads it from Redis
                warm.append(ttft(servers["b"], q))          # B's own prefix cache
                for mode in args.modes:
                    # A prompt per mode, so neither finds the other's blocks.
                    m = migrate_once(routers[mode], servers, text(f"mig-{ctx}-{rep}-{mode}", ctx),
                                     f"bench-{ctx}-{rep}-{mode}")
                    assert m.get("outcome") == "migrated", m
                    moves[mode].append(m)
                    load = os.getloadavg()[0]
                    reps.append(rep_row(ctx, rep, mode, m, load))
                    print(f"  {ctx} rep {rep} {mode}: blocking {m['blocking_ms']:.1f} ms, waited "
                          f"{m['cut_wait_tokens']} tokens, target computed {m['computed']:.0f}, target TTFT "
                          f"{m['engine_ttft_ms']:.1f} (queue {m['queue_ms']:.1f}, prefill {m['prefill_ms']:.1f}), "
                          f"load {load:.1f}", flush=True)
            med = statistics.median
            rows.append(f"| {ctx} | {args.reps} | {med(cold):.1f} | {med(ext):.1f} | {med(warm):.1f} | "
                        f"{med(cold) / med(ext):.2f} | {med(ext) / med(warm):.2f} |")
            summaries += [summary(ctx, mode, moves[mode]) for mode in args.modes]
    finally:
        for router in routers.values():
            router.stop()
        for s in servers.values():
            s.stop()
        store.stop()
    table = "\n".join([
        "| context | cut | reps | migration blocking median ms | max ms | tokens waited before the cut (median) | "
        "target loaded tokens (median) | target computed tokens (median) | (max) | target TTFT median ms (vLLM) | "
        "of which prefill | router + HTTP median ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *summaries])
    table += "\n\n" + "\n".join([
        "| context | rep | cut | blocking ms | resumed tokens | tokens waited | predicted tail | target loaded | "
        "target computed | target TTFT ms (vLLM) | of which queued | of which prefill | router + HTTP | "
        "load average |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *reps])
    table += "\n\n" + "\n".join([
        "| context | reps | TTFT cold ms | TTFT external (Redis) ms | TTFT warm ms | cold / external | "
        "external / warm |", "|---:|---:|---:|---:|---:|---:|---:|", *rows])
    print(table)
    if args.out:
        Path(args.out).write_text(table + f"\n\nload average at the end: {os.getloadavg()}\n")


if __name__ == "__main__":
    main()
