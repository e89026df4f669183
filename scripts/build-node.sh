#!/usr/bin/env bash
# Build the pieces of a real Kubernetes node for the test harness's `node` mode: kubelet and
# kube-proxy (same k8s.io/kubernetes module and staging pins as scripts/build-k8s-harness.sh),
# containerd v2 with its runc shim and ctr, the CNI plugins, and a `pause` sandbox image
# (an OCI archive made with umoci, so no registry is ever contacted).
#
# Everything is built from Go modules (CGO_ENABLED=0) into a cache outside the clone, keyed by
# every pin below: a warm machine skips the build and says so. runc needs cgo and libseccomp, so
# it comes from Debian (installed only when missing, like scripts/test.sh's packages).
# Prints the cache directory (holding bin/, cni/ and images/) on its last line.
# Recipe and measurements: ../shared/guides/real-node.md.
set -euo pipefail

K8S_VERSION=v1.34.10
STAGING_VERSION=v0.34.10
CONTAINERD_VERSION=v2.4.2
CNI_VERSION=v1.10.0
PAUSE_REV=1

KEY="node-k8s-${K8S_VERSION}_containerd-${CONTAINERD_VERSION}_cni-${CNI_VERSION}_pause-${PAUSE_REV}"
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/cache.sh"
cache_init build-node
H="$CACHE_ROOT/k8s-harness/$KEY"
BIN="$H/bin" CNI="$H/cni" IMG="$H/images"
WANT=("$BIN/kubelet" "$BIN/kube-proxy" "$BIN/containerd" "$BIN/containerd-shim-runc-v2" "$BIN/ctr"
  "$CNI/bridge" "$CNI/host-local" "$CNI/loopback" "$IMG/pause.tar")

# -- Debian packages the node runs (only when missing) ----------------------------------------
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/apt.sh"
apt_install_missing log runc:runc umoci:umoci iptables:iptables nft:nftables openssl:openssl

all_present() {
  local f
  for f in "${WANT[@]}"; do [ -s "$f" ] || return 1; done
  "$BIN/kubelet" --version 2>/dev/null | grep -q "Kubernetes $K8S_VERSION" || return 1
  "$BIN/containerd" --version 2>/dev/null | grep -q "$CONTAINERD_VERSION" || return 1
}

if all_present; then
  cache_warm "$H" "node binaries for $KEY already cached in $H: skipping Go builds"
fi

command -v go >/dev/null || { log "go is required (Go >= 1.26.8 for CNI $CNI_VERSION)"; exit 1; }
mkdir -p "$BIN" "$CNI" "$IMG" "$H/src/kubelet" "$H/src/containerd" "$H/src/cni" "$H/src/pause"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-modcacherw
start=$(date +%s)

# --- kubelet + kube-proxy: the harness's go.mod with two more tools ------------------------
if ! { [ -s "$BIN/kubelet" ] && [ -s "$BIN/kube-proxy" ]; }; then
  log "building kubelet and kube-proxy $K8S_VERSION"
  t=$(date +%s)
  source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/k8s-build.sh"
  k8s_gomod nodebin kubelet kube-proxy >"$H/src/kubelet/go.mod"
  # The control-plane build's go.sum already holds almost every hash: start from it.
  harness_sum=$(ls "$CACHE_ROOT"/k8s-harness/k8s-"$K8S_VERSION"_*/src/k8s/go.sum 2>/dev/null | head -n1 || true)
  [ -n "$harness_sum" ] && cp "$harness_sum" "$H/src/kubelet/go.sum"
  k8s_build "$H/src/kubelet" kubelet kube-proxy
  log "kubelet + kube-proxy built in $(( $(date +%s) - t ))s"
fi

# --- containerd v2 (own module: its go.mod needs a newer go line) --------------------------
if ! { [ -s "$BIN/containerd" ] && [ -s "$BIN/containerd-shim-runc-v2" ] && [ -s "$BIN/ctr" ]; }; then
  log "building containerd $CONTAINERD_VERSION"
  t=$(date +%s)
  CM=github.com/containerd/containerd/v2
  printf 'module harness.local/containerdbin\n\ngo 1.24.0\n\ntool (\n\t%s/cmd/containerd\n\t%s/cmd/containerd-shim-runc-v2\n\t%s/cmd/ctr\n)\n\nrequire %s %s\n' \
    "$CM" "$CM" "$CM" "$CM" "$CONTAINERD_VERSION" >"$H/src/containerd/go.mod"
  (
    cd "$H/src/containerd"
    go mod tidy
    go build -trimpath -tags "no_btrfs no_devmapper no_zfs no_aufs" \
      -ldflags "-s -w -X $CM/version.Version=$CONTAINERD_VERSION" -o "$BIN/" \
      "$CM/cmd/containerd" "$CM/cmd/containerd-shim-runc-v2" "$CM/cmd/ctr"
  )
  log "containerd built in $(( $(date +%s) - t ))s"
fi

# --- CNI plugins ------------------------------------------------------------------------------
if ! { [ -s "$CNI/bridge" ] && [ -s "$CNI/host-local" ] && [ -s "$CNI/loopback" ]; }; then
  log "building CNI plugins $CNI_VERSION"
  t=$(date +%s)
  P=github.com/containernetworking/plugins/plugins
  printf 'module harness.local/cnibin\n\ngo 1.24.0\n\ntool (\n\t%s/main/bridge\n\t%s/main/loopback\n\t%s/ipam/host-local\n)\n\nrequire github.com/containernetworking/plugins %s\n' \
    "$P" "$P" "$P" "$CNI_VERSION" >"$H/src/cni/go.mod"
  (cd "$H/src/cni" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$CNI/" \
    "$P/main/bridge" "$P/main/loopback" "$P/ipam/host-local")
  log "CNI plugins built in $(( $(date +%s) - t ))s"
fi

# --- pause: the sandbox image (reaps children, exits on SIGTERM) -------------------------------
if [ ! -s "$IMG/pause.tar" ]; then
  log "building the pause image"
  cat >"$H/src/pause/main.go" <<'EOF'
// pause holds a pod's namespaces open: it sleeps until SIGTERM/SIGINT and reaps orphans on SIGCHLD.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			var ws syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
EOF
  printf 'module harness.local/pause\n\ngo 1.24.0\n' >"$H/src/pause/go.mod"
  (cd "$H/src/pause" && go build -trimpath -ldflags "-s -w" -o "$H/src/pause/pause" .)
  work=$(mktemp -d)
  (
    cd "$work"
    umoci init --layout oci
    umoci new --image oci:pause
    umoci unpack --rootless --image oci:pause b
    install -m755 "$H/src/pause/pause" b/rootfs/pause
    umoci repack --image oci:pause b
    umoci config --image oci:pause --config.entrypoint /pause --config.user 65535:65535
    umoci gc --layout oci
    # ctr needs a full image name; umoci tags cannot hold '/' or ':'.
    python3 -c 'import json,sys;p="oci/index.json";d=json.load(open(p))
for m in d["manifests"]: m.setdefault("annotations",{})["io.containerd.image.name"]="local.test/pause:1"
json.dump(d,open(p,"w"))'
    tar -C oci -cf "$IMG/pause.tar.tmp" . && mv "$IMG/pause.tar.tmp" "$IMG/pause.tar"
  )
  rm -rf "$work"
fi

all_present || { log "build finished but node binaries are missing or report the wrong version"; exit 1; }
cache_done "$H" "built $KEY in $(( $(date +%s) - start ))s into $H ($(du -sh "$H" | cut -f1) with sources)"
