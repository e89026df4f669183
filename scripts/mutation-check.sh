#!/usr/bin/env bash
# Mutation check for the tests issue #23 listed as able to pass by accident: each test must FAIL
# when the behaviour it names is broken. Run by hand (not by CI), from a clean checkout with the
# venv made by scripts/bootstrap.sh:   nice -n 19 bash scripts/mutation-check.sh
#
# kvpilot is installed editable (the venv imports this tree), so each mutation is a one-string
# edit made in place and undone with `git checkout`, also on exit. Each test runs once unmutated
# (it must pass), then once per mutation; prints `KILLED <case>` (the test failed, as it should)
# or `SURVIVED <case>` (it passed: bad). Exits non-zero if any survives or a baseline fails.
# The packaging test reads the installed metadata, not pyproject.toml: its case builds metadata
# from the (mutated) pyproject.toml (setuptools egg_info, no network) and puts it first on PYTHONPATH.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${KVPILOT_VENV:-$root/.venv}/bin/python"
files=(sim/elastic.py autoscaler/planner.py sim/cluster.py sim/metrics.py router/policies/dualmap.py
       router/depth.py pyproject.toml)
git diff --quiet HEAD -- "${files[@]}" || { echo "mutation-check: commit or stash changes to ${files[*]}" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'git checkout -q -- "${files[@]}"; rm -rf "$tmp"' EXIT
export PYTHONDONTWRITEBYTECODE=1   # no mutant's bytecode left in __pycache__
status=0

mutate() {  # FILE OLD NEW: replace the single occurrence of OLD; fail loudly if the code drifted
  "$py" -P - "$@" <<'EOF'
import pathlib, sys
path, old, new = sys.argv[1:]
text = pathlib.Path(path).read_text()
if text.count(old) != 1:
    sys.exit(f"mutation-check: {path} has {text.count(old)} copies of {old!r}, expected 1")
pathlib.Path(path).write_text(text.replace(old, new))
EOF
}

run_test() {  # TEST...: pytest's exit status (1: a test failed)
  local path=""
  if [[ "$*" == *test_packaging.py* ]]; then   # metadata built from pyproject.toml, offline
    path="$tmp/meta" && rm -rf "$path" && mkdir -p "$path"
    "$py" -P -c 'from setuptools import setup; setup()' -q egg_info --egg-base "$path" >"$tmp/log" 2>&1 || return 3
  fi
  PYTHONPATH="$path" "$py" -P -m pytest -q -p no:cacheprovider "$@" >"$tmp/log" 2>&1 && return 0 || return $?
}

baseline() {  # TEST...: must pass unmutated
  if run_test "$@"; then echo "baseline ok: $*"; else echo "BASELINE FAILS: $*"; tail -20 "$tmp/log"; status=1; fi
}

check() {  # NAME FILE OLD NEW TEST...: mutate, expect the test to fail, restore
  local name="$1" file="$2" old="$3" new="$4" rc=0
  shift 4
  mutate "$file" "$old" "$new"
  run_test "$@" || rc=$?
  git checkout -q -- "$file"
  case $rc in
    1) echo "KILLED $name  ($(grep -m1 '^E ' "$tmp/log" | cut -c1-110 | sed 's/^E  *//'))" ;;
    0) echo "SURVIVED $name"; status=1 ;;
    *) echo "ERROR $name (exit $rc)"; tail -20 "$tmp/log"; status=1 ;;
  esac
}

elastic=tests/unit/sim/test_elastic.py::test_signals_report_demand_and_missing_latency_as_none
bounds=tests/unit/autoscaler/test_planner.py::test_bounds_hold
realtime=(tests/integration/sim/test_realtime_matches_virtual.py -k same_ttft)
cold=tests/unit/test_dualmap.py::test_a_cold_shared_prefix_sticks_to_one_instance_under_light_load
hot=tests/unit/test_dualmap.py::test_a_hot_shared_prefix_spreads_by_what_follows_it
packaging=tests/unit/test_packaging.py::test_base_install_has_no_plotting_kubernetes_or_kv_event_libraries

for t in "$elastic" "$bounds" "$cold" "$hot" "$packaging"; do baseline "$t"; done
baseline "${realtime[@]}"
[ "$status" = 0 ] || exit 1

check elastic-idle-ttft-reads-0 sim/elastic.py \
  'ttft_p90_s=percentile(ttfts, 90) if ttfts else None' 'ttft_p90_s=percentile(ttfts, 90) if ttfts else 0.0' "$elastic"
check elastic-idle-attainment-reads-0 sim/elastic.py \
  'slo_ttft_s) / len(ttfts) if ttfts else None' 'slo_ttft_s) / len(ttfts) if ttfts else 0.0' "$elastic"
clamp='return min(c.max_replicas, max(c.min_replicas, desired)), reason'
check planner-no-max-clamp autoscaler/planner.py "$clamp" 'return max(c.min_replicas, desired), reason' "$bounds"
check planner-no-min-clamp autoscaler/planner.py "$clamp" 'return min(c.max_replicas, desired), reason' "$bounds"
check virtual-cached-tokens-off-by-a-block sim/cluster.py \
  'seq.cached_tokens, seq.preemptions))' 'seq.cached_tokens + 16, seq.preemptions))' "${realtime[@]}"
check live-prefix-hits-counter-miscounts sim/metrics.py \
  'c.prefix_cache_hits)' 'c.prefix_cache_hits + 16)' "${realtime[@]}"
check dualmap-key-ignores-the-prefix router/policies/dualmap.py \
  'key = self.adaptive.key(request.block_hashes)[0]' 'key = self.adaptive.key(request.block_hashes[-1:])[0]' "$cold"
check dualmap-hot-prefix-never-split router/depth.py \
  'split = hot.get(hashes[d - 1])' 'split = None' "$hot"
check base-install-pulls-matplotlib pyproject.toml \
  '"rich>=13",' '"rich>=13", "matplotlib>=3.8",' "$packaging"
exit "$status"
