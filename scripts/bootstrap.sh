#!/usr/bin/env bash
# Create (or refresh) the project venv with kvpilot and its test extras. Prints nothing on success
# but progress lines. Used by scripts/test.sh and scripts/demo.sh.
#   KVPILOT_VENV   venv location (default: .venv in the repo)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="${KVPILOT_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  printf '\n==> creating %s\n' "$venv"
  python3 -m venv "$venv"
fi
printf '\n==> installing kvpilot[test] into %s\n' "$venv"
# -P: the repo root holds a folder named `operator`, which would shadow the standard library's
# module if the current directory were on sys.path.
"$venv/bin/python" -P -m pip install -q --disable-pip-version-check -e ".[test]"
