"""Prefix-cache hit rate right after a scale-in, with and without the router's handover.

    .venv/bin/python -P bench/scale_handover.py [--workers 4] [--docs 32] [--doc-tokens 2048] [--warm 2]

Starts Debian's redis-server, `--workers` `kvpilot sim serve --kv-store` processes (real time,
`--time-scale` faster than the modelled H100) and the router (DualMap, endpoints from a file, as
in local mode). Each of `--docs` documents is asked `--warm` times, each time with its own
question after it, so every document is a hot prefix. Then the worker that served the most
documents is removed from the endpoints file (what local mode and Kubernetes discovery do on
scale-in), and after the handover (or, with it off, the same settle time) each document is asked
once more. Reported per run: the prompt-token hit rate of that round, over all documents and
over those the removed worker served, the handover's wall time and KV bytes. Twice: handover
on, and off (`handover.enabled: false`), everything else equal. Results:
bench/results/scale_handover.md.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvpilot.procs import wait_for
from kvpilot.router.config import Endpoint
from kvpilot.router.endpoints_file import EndpointsDoc, write_endpoints
from kvpilot.testing.redis import RedisServer
from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text


def complete(url: str, prompt: str) -> tuple[str, int, int]:
    body = json.dumps({"model": "sim-model", "prompt": prompt, "max_tokens": 2}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        usage = json.loads(resp.read())["usage"]
        return (resp.headers.get("X-Kvpilot-Endpoint", ""), int(usage["prompt_tokens_details"]["cached_tokens"]),
                int(usage["prompt_tokens"]))


def metric(text: str, name: str, outcome: str = "") -> float:
    """Sum of a scale-in metric's samples (of one outcome, if given)."""
    label = f'[^}}]*outcome="{outcome}"' if outcome else ""
    return sum(float(v) for v in re.findall(rf'^{name}{{[^}}]*kind="scale_in"{label}[^}}]*}} (\S+)', text, re.M))


def run(args: argparse.Namespace, handover: bool, redis: RedisServer, workdir: Path) -> dict[str, Any]:
    workers = {f"w{i}": SimWorker("--profile", args.profile, "--kv-store", redis.url, "--time-scale",
                                  str(args.time_scale), workdir=workdir) for i in range(args.workers)}
    path = workdir / f"endpoints-{handover}.yaml"

    def publish(names: list[str]) -> None:
        write_endpoints(path, EndpointsDoc(endpoints=[Endpoint(name=n, url=workers[n].url)  # type: ignore[arg-type]
                                                      for n in names]))

    publish(list(workers))
    router = RouterProcess([{"name": "sim-model", "policy": "dualmap", "endpointsFile": str(path),
                             "handover": {"enabled": handover}}], workdir=workdir)
    try:
        wait_for(lambda: urllib.request.urlopen(router.url + "/ready", timeout=1).status == 200, 20, "router")
        docs = [block_text(d, args.doc_tokens) for d in range(args.docs)]
        question = 0
        home: dict[int, str] = {}
        for _ in range(args.warm):
            for d, doc in enumerate(docs):
                question += 1
                home[d] = complete(router.url, doc + block_text(100_000 + question, 64))[0]
        leaving = max(workers, key=lambda n: sum(h == n for h in home.values()))
        t0 = time.monotonic()
        publish([n for n in workers if n != leaving])
        if handover:
            wait_for(lambda: metric(router.metrics_text(), "kvpilot_router_handovers_total") >= 1, 60, "handover")
        else:
            time.sleep(2.0)  # the router picks the file up within its 1 s poll
        settle = time.monotonic() - t0
        text = router.metrics_text()
        workers[leaving].stop()
        cached = total = moved_cached = moved_total = 0
        for d, doc in enumerate(docs):
            question += 1
            _, c, p = complete(router.url, doc + block_text(100_000 + question, 64))
            cached, total = cached + c, total + p
            if home[d] == leaving:
                moved_cached, moved_total = moved_cached + c, moved_total + p
        return {"handover": handover, "leaving_docs": sum(h == leaving for h in home.values()),
                "hit_rate": cached / total, "moved_hit_rate": moved_cached / max(1, moved_total),
                "settle_s": settle, "outcome_ok": metric(text, "kvpilot_router_handovers_total", "ok"),
                "bytes": metric(text, "kvpilot_router_handover_bytes_total"),
                "prefixes": metric(text, "kvpilot_router_handover_prefixes_total")}
    finally:
        router.stop()
        for w in workers.values():
            w.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--profile", default="h100-qwen2.5-0.5b")
    ap.add_argument("--time-scale", type=float, default=20.0)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kvpilot-bench-handover-"))
    redis = RedisServer(workdir)
    try:
        rows = [run(args, on, redis, workdir) for on in (True, False)]
    finally:
        redis.stop()
    print("| handover | docs on the removed worker | hit rate, all docs | hit rate, moved docs | settle s "
          "| handovers ok | prefixes moved | KV MiB moved |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['handover'] else 'off'} | {r['leaving_docs']} | {r['hit_rate']:.1%} "
              f"| {r['moved_hit_rate']:.1%} | {r['settle_s']:.2f} | {r['outcome_ok']:.0f} | {r['prefixes']:.0f} "
              f"| {r['bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
