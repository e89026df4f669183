#!/usr/bin/env bash
# ruff over the tree; mypy (strict) over the `kvpilot` namespace.
#
# mypy cannot follow setuptools' editable-install import hook that maps `kvpilot.router`
# to router/ and so on, so we give it a tree of symlinks with the installed layout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="${KVPILOT_VENV:-$root/.venv}"
"$venv/bin/ruff" check .
tree="$root/.build/typecheck"
rm -rf "$tree" && mkdir -p "$tree/kvpilot"
for f in core/*; do ln -s "$root/$f" "$tree/kvpilot/$(basename "$f")"; done
for pkg in operator router autoscaler kvtransfer sim; do ln -s "$root/$pkg" "$tree/kvpilot/$pkg"; done
ln -s "$root/rayserve" "$tree/kvpilot/ray"   # kvpilot.ray lives in rayserve/ (see pyproject.toml)
MYPYPATH="$tree" "$venv/bin/mypy" --cache-dir "$root/.build/mypy-cache" -p kvpilot
