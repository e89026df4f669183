#!/usr/bin/env bash
# KubeRay's CRDs (RayService, RayCluster, RayJob) for the e2e harness, from the Go module
# github.com/ray-project/kuberay/ray-operator (the YAMLs ship in its config/crd/bases), fetched
# through the Go module proxy and cached by version outside the clone, like the harness binaries
# (scripts/build-k8s-harness.sh). A warm cache returns at once. Prints the CRD folder on its last line.
set -euo pipefail

source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/kuberay.sh"   # KUBERAY_VERSION, KUBERAY_MODULE
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/cache.sh"
cache_init kuberay-crds
OUT="$CACHE_ROOT/kuberay/$KUBERAY_VERSION/crds"
WANT=(ray.io_rayservices.yaml ray.io_rayclusters.yaml ray.io_rayjobs.yaml)

all_present() {
  local f
  for f in "${WANT[@]}"; do [ -s "$OUT/$f" ] || return 1; done
}

if all_present; then
  cache_warm "$OUT" "KubeRay $KUBERAY_VERSION CRDs already cached in $OUT"
fi

command -v go >/dev/null || { log "go is required to fetch $KUBERAY_MODULE@$KUBERAY_VERSION from the module proxy"; exit 1; }
export GOTOOLCHAIN=local GOFLAGS=-modcacherw
# `go mod download` outside any module: verifies the zip against the checksum database and
# extracts it into the module cache; its JSON names the folder.
dir="$(cd "$(mktemp -d)" && go mod download -json "$KUBERAY_MODULE@$KUBERAY_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
[ -n "$dir" ] && [ -d "$dir/config/crd/bases" ] || { log "no config/crd/bases in $KUBERAY_MODULE@$KUBERAY_VERSION"; exit 1; }
mkdir -p "$OUT.tmp"
for f in "${WANT[@]}"; do cp "$dir/config/crd/bases/$f" "$OUT.tmp/$f" && chmod 0644 "$OUT.tmp/$f"; done
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
cache_done "$OUT" "copied KubeRay $KUBERAY_VERSION CRDs from $dir into $OUT"
