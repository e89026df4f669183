#!/usr/bin/env bash
# The KubeRay operator binary (github.com/ray-project/kuberay/ray-operator, its main package),
# built from the Go module proxy into a cache keyed by version, like the harness binaries
# (scripts/build-k8s-harness.sh). A warm cache returns at once. Prints the binary's path on its last line.
set -euo pipefail

source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/kuberay.sh"   # KUBERAY_VERSION, KUBERAY_MODULE
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/cache.sh"
cache_init kuberay-operator
BIN="$CACHE_ROOT/kuberay/$KUBERAY_VERSION/bin"

if [ -x "$BIN/ray-operator" ]; then
  cache_warm "$BIN/ray-operator" "KubeRay operator $KUBERAY_VERSION already built in $BIN"
fi
command -v go >/dev/null || { log "go is required to build $KUBERAY_MODULE@$KUBERAY_VERSION"; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-modcacherw
mkdir -p "$BIN"
start=$(date +%s)
# The module has no replace directives, so `go install pkg@version` builds it as released.
GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "$KUBERAY_MODULE@$KUBERAY_VERSION"
cache_done "$BIN/ray-operator" "built KubeRay operator $KUBERAY_VERSION in $(( $(date +%s) - start ))s into $BIN"
