#!/usr/bin/env bash
# Create (once) a bench-only venv with the peer routers that `kvpilot bench peers` compares DualMap
# against, from PyPI, cached outside the clone and keyed by their versions (a warm machine skips the
# install). Prints the venv path last. Not part of kvpilot's own dependencies: the peers are Rust
# binaries in Python wheels, only the benchmark (bench/peers.py) and its skip-if-absent test use them.
#   KVPILOT_CACHE   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/kvpilot)
set -euo pipefail

SGLANG_ROUTER_VERSION=0.3.2
VLLM_ROUTER_VERSION=0.1.17
KEY="sglang-router-${SGLANG_ROUTER_VERSION}_vllm-router-${VLLM_ROUTER_VERSION}"
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/cache.sh"
cache_init peers-env
VENV="$CACHE_ROOT/peers/$KEY/venv"
STAMP="$VENV/.kvpilot-complete"

if [ -f "$STAMP" ]; then
  cache_warm "$VENV" "cached in $VENV: skipping install"
fi

t0=$(date +%s)
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/venv.sh"
fresh_venv "$VENV"
log "installing sglang-router==$SGLANG_ROUTER_VERSION vllm-router==$VLLM_ROUTER_VERSION"
"${pip[@]}" install "sglang-router==$SGLANG_ROUTER_VERSION" "vllm-router==$VLLM_ROUTER_VERSION"
# Both must start: a wheel without its Rust extension for this platform fails here, not in the bench.
"$VENV/bin/python" -c 'import sglang_router, vllm_router' >/dev/null
touch "$STAMP"
cache_done "$VENV" "installed in $(( $(date +%s) - t0 ))s"
