#!/usr/bin/env bash
# `make demo`: the main job until local mode (`kvpilot up`) lands. Replays the first 3,000
# requests of the Mooncake conversation trace on 8 simulated H100s running Llama-3.1-8B, in
# virtual time, and prints SLO attainment, latency percentiles and cache hit rate.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
venv="${KVPILOT_VENV:-$root/.venv}"
mkdir -p "$root/bench/out"
exec "$venv/bin/kvpilot" sim cluster --workload mooncake --requests "${REQUESTS:-3000}" --instances 8 \
  --profile h100-llama3-8b --slo-ttft 5 --json "$root/bench/out/demo.json" "$@"
