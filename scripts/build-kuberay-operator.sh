#!/usr/bin/env bash
# The KubeRay operator binary (github.com/ray-project/kuberay/ray-operator, its main package),
# built from the Go module proxy into a cache keyed by version, like the harness binaries
# (scripts/build-k8s-harness.sh). A warm cache returns at once. Prints the binary's path on its last line.
set -euo pipefail

KUBERAY_VERSION=v1.5.0
MODULE=github.com/ray-project/kuberay/ray-operator

CACHE_ROOT="${KVPILOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpilot}"
BIN="$CACHE_ROOT/kuberay/$KUBERAY_VERSION/bin"
log() { echo "[kuberay-operator] $*" >&2; }

if [ -x "$BIN/ray-operator" ]; then
  log "KubeRay operator $KUBERAY_VERSION already built in $BIN"
  echo "$BIN/ray-operator"
  exit 0
fi
command -v go >/dev/null || { log "go is required to build $MODULE@$KUBERAY_VERSION"; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-modcacherw
mkdir -p "$BIN"
start=$(date +%s)
# The module has no replace directives, so `go install pkg@version` builds it as released.
GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "$MODULE@$KUBERAY_VERSION"
log "built KubeRay operator $KUBERAY_VERSION in $(( $(date +%s) - start ))s into $BIN"
echo "$BIN/ray-operator"
