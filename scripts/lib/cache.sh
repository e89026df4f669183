# shellcheck shell=bash
# The caching preamble shared by the scripts that build or fetch something into kvpilot's cache
# outside the clone (build-k8s-harness.sh, build-node.sh, build-kuberay-operator.sh,
# kuberay-crds.sh, peers-env.sh), so where the cache lives and what a warm run prints is said once.
#
#   set -euo pipefail
#   source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/cache.sh"
#   cache_init NAME            # CACHE_ROOT, and log() prefixed [NAME]
#   if <cache is complete>; then cache_warm "$PATH" "MESSAGE"; fi
#   … build …
#   cache_done "$PATH" "MESSAGE"
#
# Output contract (callers run `$(bash scripts/X.sh | tail -n1)`): progress and errors go to stderr;
# the LAST line on stdout is the cache path.
#   KVPILOT_CACHE   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/kvpilot)

cache_init() {
  CACHE_ROOT="${KVPILOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpilot}"
  CACHE_LOG_NAME="$1"
}

log() { echo "[${CACHE_LOG_NAME:?cache_init first}] $*" >&2; }

# The cache is warm: say so, print its path as the last line and end the script (exit 0).
cache_warm() {
  log "$2"
  echo "$1"
  exit 0
}

# A build finished: say so and print the cache path as the last line.
cache_done() {
  log "$2"
  echo "$1"
}
