#!/usr/bin/env bash
# Build the real Kubernetes test binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm) from Go modules into a cache outside the clone.
#
# The cache is keyed by every pin below, so a warm machine skips the build entirely; a
# changed pin builds into a new directory. Prints the bin directory on its last line.
# Recipe: ../shared/guides/k8s-harness.md.
set -euo pipefail

K8S_VERSION=v1.34.10
STAGING_VERSION=v0.34.10
ETCD_VERSION=v3.6.4
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.19.4

KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}"
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/cache.sh"
cache_init k8s-harness
H="$CACHE_ROOT/k8s-harness/$KEY"
BIN="$H/bin"
WANT=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

all_present() {
  local b
  for b in "${WANT[@]}"; do [ -x "$BIN/$b" ] || return 1; done
  "$BIN/kube-apiserver" --version 2>/dev/null | grep -q "Kubernetes $K8S_VERSION" || return 1
}

if all_present; then
  cache_warm "$BIN" "binaries for $KEY already cached in $BIN: skipping Go builds"
fi

command -v go >/dev/null || { log "go is required (Go >= 1.24) to build the test control plane"; exit 1; }
avail_kb=$(df -Pk "$CACHE_ROOT" 2>/dev/null | awk 'NR==2{print $4}' || echo 0)
mkdir -p "$BIN" "$H/src/k8s" "$H/src/etcd"
avail_kb=$(df -Pk "$H" | awk 'NR==2{print $4}')
if [ "${avail_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
  log "warning: less than 8 GiB free under $H; the Go build may run out of disk"
fi

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-modcacherw
start=$(date +%s)

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubectl -------------------
if ! { [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] && [ -x "$BIN/kube-scheduler" ] && [ -x "$BIN/kubectl" ]; }; then
  log "building kubernetes $K8S_VERSION (apiserver, controller-manager, scheduler, kubectl)"
  source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/k8s-build.sh"
  k8s_gomod k8sbin kube-apiserver kube-controller-manager kube-scheduler kubectl >"$H/src/k8s/go.mod"
  k8s_build "$H/src/k8s" kube-apiserver kube-controller-manager kube-scheduler kubectl
fi

# --- etcd (separate module keeps etcd's grpc/otel pins out of the k8s build) -----------
if [ ! -x "$BIN/etcd" ]; then
  log "building etcd $ETCD_VERSION"
  printf 'module harness.local/etcdbin\n\ngo 1.24.0\n\ntool go.etcd.io/etcd/server/v3\n\nrequire go.etcd.io/etcd/server/v3 %s\n' \
    "$ETCD_VERSION" >"$H/src/etcd/go.mod"
  (cd "$H/src/etcd" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
fi

# --- kwok (fake nodes) ------------------------------------------------------------------
if [ ! -x "$BIN/kwok" ]; then
  log "building kwok $KWOK_VERSION"
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi

# --- helm -------------------------------------------------------------------------------
if [ ! -x "$BIN/helm" ]; then
  log "building helm $HELM_VERSION"
  HV=helm.sh/helm/v3
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w -X $HV/internal/version.version=$HELM_VERSION \
    -X $HV/pkg/chartutil.k8sVersionMajor=1 -X $HV/pkg/chartutil.k8sVersionMinor=34" "$HV/cmd/helm@$HELM_VERSION"
fi

all_present || { log "build finished but binaries are missing or report the wrong version"; exit 1; }
cache_done "$BIN" "built $KEY in $(( $(date +%s) - start ))s into $BIN ($(du -sh "$BIN" | cut -f1))"
