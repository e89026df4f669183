#!/usr/bin/env bash
# `make demo`, the main job: the local control plane (simulated GPU workers and the DualMap router
# as real processes on loopback) under a replay of the Mooncake conversation trace, then the same
# with round-robin routing, and a report of both.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
venv="${KVPILOT_VENV:-$root/.venv}"
exec "$venv/bin/kvpilot" demo "$@"
