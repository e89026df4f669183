# shellcheck shell=bash
# Building k8s.io/kubernetes commands from Go modules, shared by build-k8s-harness.sh (the control
# plane) and build-node.sh (kubelet, kube-proxy), so both pin the same staging modules and stamp
# the same version. Needs K8S_VERSION, STAGING_VERSION and BIN.
#
#   source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/k8s-build.sh"
#   k8s_gomod NAME CMD… >DIR/go.mod     # module harness.local/NAME with k8s.io/kubernetes/cmd/CMD as tools
#   k8s_build DIR CMD…                  # go mod tidy in DIR, then build the CMDs into $BIN

# The staging modules k8s.io/kubernetes replaces with paths inside its own tree: a go.mod outside
# it must pin each to the matching release ($STAGING_VERSION) instead.
K8S_STAGING=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms
  kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller)

k8s_gomod() {
  local name=$1 cmd s
  shift
  printf 'module harness.local/%s\n\ngo 1.24.0\n\ngodebug default=go1.24\n\ntool (\n' "$name"
  for cmd in "$@"; do printf '\tk8s.io/kubernetes/cmd/%s\n' "$cmd"; done
  printf ')\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
  for s in "${K8S_STAGING[@]}"; do printf '\tk8s.io/%s => k8s.io/%s %s\n' "$s" "$s" "$STAGING_VERSION"; done
  printf ')\n'
}

# The binaries report $K8S_VERSION as a release build does (kubectl version, the apiserver's
# /version, the kubelet's node status), not "v0.0.0-master".
k8s_build() {
  local dir=$1 cmd
  shift
  local pkgs=()
  for cmd in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$cmd"); done
  (
    cd "$dir"
    go mod tidy
    X=k8s.io/component-base/version C=k8s.io/client-go/pkg/version
    minor=$(echo "$K8S_VERSION" | cut -d. -f2)
    LDF="-s -w -X $X.gitVersion=$K8S_VERSION -X $X.gitMajor=1 -X $X.gitMinor=$minor -X $X.gitTreeState=clean"
    LDF="$LDF -X $X.buildDate=2026-01-01T00:00:00Z -X $C.gitVersion=$K8S_VERSION -X $C.gitMajor=1 -X $C.gitMinor=$minor"
    go build -trimpath -ldflags "$LDF" -o "$BIN/" "${pkgs[@]}"
  )
}
